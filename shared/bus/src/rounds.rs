//! Fair turns for an actor's loop over several inputs.
//!
//! An actor that reads its inputs with a `biased` select serves the first
//! ready input every time: a steady stream on it (route requests, request
//! events) starves every input below it (state deltas, the flush tick).
//! [`Rounds`] bounds that. Within a *round* each input may take at most
//! `budget` turns; an input that has used its budget is left out (its select
//! branch is disabled by `if rounds.may(i)`) until the round ends, which is
//! when no input that may still take a turn is ready (a last branch,
//! `if rounds.started()`, calls [`Rounds::next_round`]). So an input that is
//! ready waits at most `2 · (inputs − 1) · budget` turns of the others,
//! however busy they are: the rest of the round, then the inputs ahead of it
//! in the next (property `a_ready_input_waits_at_most_twice_the_others_budgets`).
//!
//! ```ignore
//! tokio::select! {
//!     biased;
//!     Some(m) = a.next(), if rounds.may(0) => { rounds.took(0); handle_a(m) }
//!     Some(m) = b.next(), if rounds.may(1) => { rounds.took(1); handle_b(m) }
//!     _ = std::future::ready(()), if rounds.started() => rounds.next_round(),
//! }
//! ```

/// Turns taken per input in the current round. See the module docs.
#[derive(Clone, Debug)]
pub struct Rounds<const N: usize> {
    used: [u32; N],
    budget: u32,
}

impl<const N: usize> Rounds<N> {
    /// At most `budget` turns (at least 1) per input and round.
    pub fn new(budget: u32) -> Self {
        Self {
            used: [0; N],
            budget: budget.max(1),
        }
    }

    /// May input `i` take a turn in this round?
    pub fn may(&self, i: usize) -> bool {
        self.used.get(i).is_some_and(|u| *u < self.budget)
    }

    /// Input `i` took a turn.
    pub fn took(&mut self, i: usize) {
        if let Some(u) = self.used.get_mut(i) {
            *u = u.saturating_add(1);
        }
    }

    /// Has any input taken a turn in this round?
    pub fn started(&self) -> bool {
        self.used.iter().any(|u| *u > 0)
    }

    /// No input that may take a turn is ready: a new round begins.
    pub fn next_round(&mut self) {
        self.used = [0; N];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One turn of a biased select over `ready` inputs: the first ready
    /// input that may take a turn takes it; if none may and the round has
    /// started, the round ends (and the select runs again).
    fn turn<const N: usize>(r: &mut Rounds<N>, ready: &[bool; N]) -> Option<usize> {
        for _ in 0..2 {
            if let Some(i) = (0..N).find(|i| ready[*i] && r.may(*i)) {
                r.took(i);
                return Some(i);
            }
            if !r.started() {
                return None;
            }
            r.next_round();
        }
        None
    }

    #[test]
    fn a_busy_first_input_does_not_starve_the_last() {
        let mut r = Rounds::<3>::new(4);
        let order: Vec<_> = (0..12)
            .filter_map(|_| turn(&mut r, &[true, true, true]))
            .collect();
        assert_eq!(order, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn an_idle_loop_does_not_spin() {
        let mut r = Rounds::<2>::new(4);
        assert!(!r.started());
        assert_eq!(turn(&mut r, &[false, false]), None);
        assert_eq!(turn(&mut r, &[true, false]), Some(0));
        // Nothing ready: the round ends once, then the loop would wait.
        assert_eq!(turn(&mut r, &[false, false]), None);
        assert!(!r.started());
    }

    proptest! {
        /// Whatever the others do, an input that stays ready takes a turn
        /// within `2 · (N − 1) · budget` turns of the others.
        #[test]
        fn a_ready_input_waits_at_most_twice_the_others_budgets(
            budget in 1u32..6,
            watched in 0usize..4,
            others in proptest::collection::vec(proptest::array::uniform4(any::<bool>()), 1..300),
        ) {
            let mut r = Rounds::<4>::new(budget);
            let bound = 2 * 3 * budget as usize;
            let mut waited = 0usize;
            for mut ready in others {
                ready[watched] = true;
                match turn(&mut r, &ready) {
                    Some(i) if i == watched => waited = 0,
                    Some(_) => {
                        waited += 1;
                        prop_assert!(waited <= bound, "waited {} > {}", waited, bound);
                    }
                    None => prop_assert!(false, "a ready input took no turn"),
                }
            }
        }
    }
}
