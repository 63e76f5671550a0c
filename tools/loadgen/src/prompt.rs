//! Prompt text for trace requests, from their block hash ids.
//!
//! Block id `h` becomes 512 words `x<h>_<k>` (`k` = 0…511, both written in
//! base 36): one token each under engine-sim's tokenisation (a token is a
//! run of non-whitespace), so equal ids give identical blocks and different
//! ids different ones. The text is cut to exactly `words` words inside the
//! block the length ends in; if the ids cover fewer words, it is padded with
//! words `pad<n>` (`n` = the word's position, base 36).

pub const BLOCK_TOKENS: u64 = 512;

fn base36(mut n: u64, out: &mut String) {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut buf = [0u8; 13];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.extend(buf[i..].iter().map(|b| char::from(*b)));
}

/// `words` whitespace-separated words, block by block.
pub fn block_text(hash_ids: &[u64], words: u64) -> String {
    let mut text = String::with_capacity(usize::try_from(words).unwrap_or(0).saturating_mul(9));
    let mut n = 0;
    'blocks: for id in hash_ids {
        for k in 0..BLOCK_TOKENS {
            if n == words {
                break 'blocks;
            }
            if n > 0 {
                text.push(' ');
            }
            text.push('x');
            base36(*id, &mut text);
            text.push('_');
            base36(k, &mut text);
            n += 1;
        }
    }
    while n < words {
        if n > 0 {
            text.push(' ');
        }
        text.push_str("pad");
        base36(n, &mut text);
        n += 1;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(t: &str) -> Vec<&str> {
        t.split_whitespace().collect()
    }

    #[test]
    fn equal_ids_equal_blocks_different_ids_different_blocks() {
        let a = block_text(&[7, 8], 700);
        let b = block_text(&[7, 9], 700);
        let (wa, wb) = (words(&a), words(&b));
        assert_eq!(wa.len(), 700);
        assert_eq!(wb.len(), 700);
        assert_eq!(wa[..512], wb[..512]);
        assert!(wa[512..].iter().zip(&wb[512..]).all(|(x, y)| x != y));
        // The same id at another position is the same block text.
        let c = block_text(&[3, 7], 1024);
        assert_eq!(words(&c)[512..], wa[..512]);
        // Words inside a block are distinct from each other.
        let mut uniq = wa[..512].to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), 512);
        // Deterministic.
        assert_eq!(a, block_text(&[7, 8], 700));
    }

    #[test]
    fn token_count_is_the_input_length() {
        for (ids, n) in [
            (vec![1u64], 1u64),
            (vec![1], 512),
            (vec![1, 2], 513),
            (vec![1, 2, 3], 1500),
            (vec![1], 600), // ids cover less: padded
            (vec![], 3),
            (vec![5, 6], 0),
        ] {
            let t = block_text(&ids, n);
            assert_eq!(t.split_whitespace().count() as u64, n, "{ids:?} {n}");
            assert!(!t.starts_with(' ') && !t.ends_with(' '));
        }
        assert_eq!(
            block_text(&[35, 36], 514).split(' ').nth(513),
            Some("x10_1")
        );
    }
}
