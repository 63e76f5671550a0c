//! Server-sent events framing: bytes in (split anywhere), the `data` of each
//! complete event out. Lines end in `\n`, `\r\n` or `\r`; an empty line ends
//! an event; several `data:` lines of one event are joined with `\n`;
//! comments (`:`) and other fields (`event:`, `id:`, `retry:`) are ignored.

#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of an incomplete line.
    line: Vec<u8>,
    /// The data of the event being read.
    data: String,
    has_data: bool,
    /// The previous chunk ended in `\r` (a `\n` next belongs to it).
    after_cr: bool,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match b {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    /// The data of an event left unterminated at the end of the stream.
    pub fn finish(&mut self) -> Option<String> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut out);
        }
        self.end_line(&mut out);
        out.pop()
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if std::mem::take(&mut self.has_data) {
                out.push(std::mem::take(&mut self.data));
            }
            return;
        }
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere() {
        let stream = b": comment\n\ndata: {\"a\":1}\n\nevent: x\r\ndata: one\r\ndata:two\r\n\r\ndata: [DONE]\n\n";
        let whole = SseDecoder::new().push(stream);
        assert_eq!(whole, vec!["{\"a\":1}", "one\ntwo", "[DONE]"]);
        // Byte by byte, the same.
        let mut d = SseDecoder::new();
        let bytewise: Vec<String> = stream.iter().flat_map(|b| d.push(&[*b])).collect();
        assert_eq!(bytewise, whole);
        // At every split point, the same.
        for k in 0..stream.len() {
            let mut d = SseDecoder::new();
            let mut got = d.push(&stream[..k]);
            got.extend(d.push(&stream[k..]));
            assert_eq!(got, whole, "split at {k}");
        }
    }

    #[test]
    fn incomplete_events() {
        let mut d = SseDecoder::new();
        assert!(d.push(b"data: {\"par").is_empty());
        assert_eq!(d.push(b"t\":1}\n\ndata: tail"), vec!["{\"part\":1}"]);
        assert_eq!(d.finish().as_deref(), Some("tail"));
        assert_eq!(SseDecoder::new().finish(), None);
    }
}
