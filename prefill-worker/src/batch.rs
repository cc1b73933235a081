//! Batch selection, as plain synchronous logic: the engine thread's line of prompts taken
//! from its mailbox, and which of them form the next prefill batch.
//!
//! Invariants: order is kept (a prompt is never overtaken, so a long one is not starved by
//! short ones behind it); a batch holds at least one prompt and otherwise at most
//! `max_batch_tokens` prompt tokens; the line holds less than one batch's worth plus one
//! prompt, so the mailbox (bounded, visible to admission) holds the rest.

use std::collections::VecDeque;

/// Prompts taken out of the mailbox and not yet admitted to a batch, each with its token count.
#[derive(Debug)]
pub struct WaitingLine<T> {
    jobs: VecDeque<(usize, T)>,
    tokens: usize,
    max_batch_tokens: usize,
}

impl<T> WaitingLine<T> {
    pub fn new(max_batch_tokens: usize) -> Self {
        WaitingLine { jobs: VecDeque::new(), tokens: 0, max_batch_tokens: max_batch_tokens.max(1) }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Prompt tokens waiting in the line.
    #[cfg(test)]
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Whether to take another prompt from the mailbox: only while the line cannot yet fill
    /// a batch.
    pub fn wants_more(&self) -> bool {
        self.tokens < self.max_batch_tokens
    }

    pub fn push_back(&mut self, tokens: usize, job: T) {
        self.tokens += tokens;
        self.jobs.push_back((tokens, job));
    }

    /// Puts prompts that could not join a batch (cache full) back at the front, in their
    /// original order, so they go first next time.
    pub fn requeue_front(&mut self, jobs: Vec<(usize, T)>) {
        for (tokens, job) in jobs.into_iter().rev() {
            self.tokens += tokens;
            self.jobs.push_front((tokens, job));
        }
    }

    /// Removes the prompts `reject` picks (e.g. whose caller went away) and returns them.
    pub fn remove_where(&mut self, mut reject: impl FnMut(&T) -> bool) -> Vec<(usize, T)> {
        let mut removed = Vec::new();
        let mut kept = VecDeque::with_capacity(self.jobs.len());
        for (tokens, job) in self.jobs.drain(..) {
            if reject(&job) {
                self.tokens -= tokens;
                removed.push((tokens, job));
            } else {
                kept.push_back((tokens, job));
            }
        }
        self.jobs = kept;
        removed
    }

    /// The next batch: prompts from the front while the batch stays within
    /// `max_batch_tokens`, and always the first one.
    pub fn take_batch(&mut self) -> Vec<(usize, T)> {
        let mut batch = Vec::new();
        let mut batch_tokens = 0;
        while let Some(&(tokens, _)) = self.jobs.front() {
            if !batch.is_empty() && batch_tokens + tokens > self.max_batch_tokens {
                break;
            }
            let job = self.jobs.pop_front().expect("front exists");
            batch_tokens += tokens;
            self.tokens -= tokens;
            batch.push(job);
        }
        batch
    }

    /// Everything in the line, in order (shutdown).
    pub fn take_all(&mut self) -> Vec<(usize, T)> {
        self.tokens = 0;
        self.jobs.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(max: usize, sizes: &[usize]) -> WaitingLine<usize> {
        let mut l = WaitingLine::new(max);
        for (i, &s) in sizes.iter().enumerate() {
            l.push_back(s, i);
        }
        l
    }

    fn ids(batch: &[(usize, usize)]) -> Vec<usize> {
        batch.iter().map(|&(_, id)| id).collect()
    }

    #[test]
    fn batch_fills_up_to_the_budget_in_order() {
        let mut l = line(10, &[3, 4, 3, 1]);
        assert_eq!(ids(&l.take_batch()), [0, 1, 2]);
        assert_eq!(l.tokens(), 1);
        assert_eq!(ids(&l.take_batch()), [3]);
        assert!(l.is_empty() && l.tokens() == 0);
        assert!(l.take_batch().is_empty());
    }

    #[test]
    fn a_prompt_over_the_budget_runs_alone() {
        let mut l = line(10, &[25, 2, 30]);
        assert_eq!(ids(&l.take_batch()), [0]);
        assert_eq!(ids(&l.take_batch()), [1]);
        assert_eq!(ids(&l.take_batch()), [2]);
    }

    #[test]
    fn no_overtaking_a_prompt_that_does_not_fit() {
        // 8 + 5 > 10 stops the batch even though the 1 behind would fit.
        let mut l = line(10, &[8, 5, 1]);
        assert_eq!(ids(&l.take_batch()), [0]);
        assert_eq!(ids(&l.take_batch()), [1, 2]);
    }

    #[test]
    fn exact_budget_is_allowed() {
        let mut l = line(10, &[5, 5, 1]);
        assert_eq!(ids(&l.take_batch()), [0, 1]);
    }

    #[test]
    fn wants_more_only_below_one_batch() {
        let mut l = WaitingLine::new(10);
        assert!(l.wants_more());
        l.push_back(9, 0);
        assert!(l.wants_more());
        l.push_back(1, 1);
        assert!(!l.wants_more());
    }

    #[test]
    fn requeued_jobs_go_first_in_their_order() {
        let mut l = line(100, &[1, 2, 3]);
        let batch = l.take_batch();
        assert!(l.is_empty());
        l.push_back(7, 9);
        l.requeue_front(batch.into_iter().skip(1).collect());
        assert_eq!(l.tokens(), 2 + 3 + 7);
        assert_eq!(ids(&l.take_batch()), [1, 2, 9]);
    }

    #[test]
    fn remove_where_keeps_order_and_token_count() {
        let mut l = line(100, &[1, 2, 3, 4]);
        let removed = l.remove_where(|&id| id % 2 == 1);
        assert_eq!(ids(&removed), [1, 3]);
        assert_eq!(l.tokens(), 4);
        assert_eq!(l.len(), 2);
        assert_eq!(ids(&l.take_all()), [0, 2]);
        assert_eq!(l.tokens(), 0);
    }
}
