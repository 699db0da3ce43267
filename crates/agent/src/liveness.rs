//! Whether something answers probes: the rule, on the time it is given
//! (sans-IO: no socket, no clock, no task; `probe` sends and receives).
//!
//! Two judges use it:
//! - a gateway judges its own mesh: it probes a few peers through the
//!   tunnel several times a second, and its mesh carries traffic while any
//!   of them answers; when none has for [`LivenessParams::lost`] it stops
//!   announcing its block and tells the controller, which moves the nodes
//!   to another exit;
//! - a node judges its exit: it probes its default route's gateway
//!   through the tunnel, and when the gateway stops answering it moves to
//!   the next one on its own, without waiting for the controller.
//!
//! Hysteresis: dead after `lost` without an answer to at least
//! `min_unanswered` probes; alive again only after answers for `recover`
//! without a gap of `lost`, so a flapping path does not move traffic back
//! and forth.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessParams {
    /// No answer for this long (to at least `min_unanswered` probes):
    /// dead.
    pub lost: Duration,
    /// Probes that must go unanswered before a target is dead (a probe
    /// interval longer than `lost` must not make it dead between two
    /// probes).
    pub min_unanswered: u32,
    /// Answers for this long: alive again.
    pub recover: Duration,
    /// A target never heard from is not judged dead before this long
    /// after the first probe: tunnels take a moment to come up.
    pub grace: Duration,
    /// Answered within this long: seen working ([`Liveness::answering`]).
    /// Two probe intervals and a margin: one lost probe does not count,
    /// and a target that stops answering is no longer "answering" well
    /// before it is dead.
    pub answered_within: Duration,
}

/// Probes every 200 ms, dead after 600 ms (3 probes) unanswered, alive
/// after 1 s of answers: the exit moves within a second of failing.
pub const DEFAULT_PARAMS: LivenessParams = LivenessParams {
    lost: Duration::from_millis(600),
    min_unanswered: 3,
    recover: Duration::from_secs(1),
    grace: Duration::from_secs(3),
    answered_within: Duration::from_millis(450),
};

/// How often the probes go, with [`DEFAULT_PARAMS`].
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct Liveness {
    params: LivenessParams,
    alive: bool,
    /// The first probe not answered since the last answer, and how many.
    unanswered_since: Option<Instant>,
    unanswered: u32,
    last_answer: Option<Instant>,
    /// While dead: since when answers come without a gap of `lost`.
    answering_since: Option<Instant>,
    /// The first probe ever.
    first_probe: Option<Instant>,
}

impl Liveness {
    /// A target taken as alive until probes say otherwise.
    pub fn new(params: LivenessParams) -> Liveness {
        Liveness {
            params,
            alive: true,
            unanswered_since: None,
            unanswered: 0,
            last_answer: None,
            answering_since: None,
            first_probe: None,
        }
    }

    pub fn alive(&self) -> bool {
        self.alive
    }

    /// Alive, with an answer within `answered_within` of `now`: the
    /// target is seen working, not only not yet judged dead.
    pub fn answering(&self, now: Instant) -> bool {
        self.alive
            && self
                .last_answer
                .is_some_and(|t| now.saturating_duration_since(t) < self.params.answered_within)
    }

    /// A probe went out.
    pub fn sent(&mut self, now: Instant) {
        self.first_probe.get_or_insert(now);
        self.unanswered_since.get_or_insert(now);
        self.unanswered = self.unanswered.saturating_add(1);
    }

    /// An answer came.
    pub fn answered(&mut self, now: Instant) {
        let gap = self
            .last_answer
            .is_none_or(|t| now.saturating_duration_since(t) >= self.params.lost);
        if !self.alive && (self.answering_since.is_none() || gap) {
            self.answering_since = Some(now);
        }
        self.last_answer = Some(now);
        self.unanswered_since = None;
        self.unanswered = 0;
    }

    /// Looks at the probes at `now`; returns the new state if it changed.
    pub fn update(&mut self, now: Instant) -> Option<bool> {
        if self.alive {
            let silent_for = self
                .unanswered_since
                .map(|t| now.saturating_duration_since(t));
            let judged = self.last_answer.is_some()
                || self
                    .first_probe
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.params.grace);
            if judged
                && self.unanswered >= self.params.min_unanswered
                && silent_for.is_some_and(|d| d >= self.params.lost)
            {
                self.alive = false;
                self.answering_since = None;
                return Some(false);
            }
            return None;
        }
        // Answers stopped again before `recover`: start over.
        if self
            .last_answer
            .is_none_or(|t| now.saturating_duration_since(t) >= self.params.lost)
        {
            self.answering_since = None;
        }
        if self
            .answering_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.params.recover)
        {
            self.alive = true;
            self.answering_since = None;
            return Some(true);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = PROBE_EVERY;

    /// Probes every tick from `t0` for `ticks`, answered as `answer` says
    /// (one answer 5 ms after its probe); returns the state changes with
    /// their tick.
    fn run(
        live: &mut Liveness,
        t0: Instant,
        ticks: u32,
        answer: impl Fn(u32) -> bool,
    ) -> Vec<(u32, bool)> {
        let mut changes = Vec::new();
        for k in 0..ticks {
            let now = t0 + TICK * k;
            live.sent(now);
            if answer(k) {
                live.answered(now + Duration::from_millis(5));
            }
            if let Some(change) = live.update(now + Duration::from_millis(10)) {
                changes.push((k, change));
            }
        }
        changes
    }

    #[test]
    fn answers_keep_it_alive() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        assert_eq!(run(&mut live, Instant::now(), 100, |_| true), vec![]);
        assert!(live.alive());
    }

    #[test]
    fn it_dies_within_a_second_of_the_last_answer() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        let changes = run(&mut live, Instant::now(), 30, |k| k < 10);
        // Tick 10 is the first unanswered; 600 ms later is tick 13.
        assert_eq!(changes, vec![(13, false)]);
        let after_last_answer = TICK * (13 - 9);
        assert!(after_last_answer < Duration::from_secs(1));
    }

    #[test]
    fn one_lost_probe_is_not_death() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        assert_eq!(
            run(&mut live, Instant::now(), 50, |k| k % 3 != 0 || k == 0),
            vec![]
        );
        assert_eq!(run(&mut live, Instant::now(), 50, |k| k % 2 == 0), vec![]);
    }

    #[test]
    fn it_comes_back_after_a_second_of_answers_and_not_before() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        let t0 = Instant::now();
        // Dead at tick 13, answers again from tick 20: alive at tick 25
        // (1 s of answers).
        let changes = run(&mut live, t0, 40, |k| !(10..20).contains(&k));
        assert_eq!(changes, vec![(13, false), (25, true)]);
    }

    #[test]
    fn a_flapping_path_stays_dead() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        // Answers for 600 ms and silence for 800 ms, repeated: dead at the
        // first 800 ms of silence (ticks 10-13), and never a whole second
        // of answers after.
        let changes = run(&mut live, Instant::now(), 200, |k| k < 5 || k % 7 < 3);
        assert_eq!(changes, vec![(13, false)]);
    }

    #[test]
    fn a_target_never_heard_gets_its_grace_then_dies() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        // Never answered: dead when the 3 s grace ends (tick 15), not at
        // 600 ms.
        assert_eq!(
            run(&mut live, Instant::now(), 30, |_| false),
            vec![(15, false)]
        );
        // Answered from the 5th probe on (a tunnel coming up): alive.
        let mut live = Liveness::new(DEFAULT_PARAMS);
        assert_eq!(run(&mut live, Instant::now(), 30, |k| k >= 5), vec![]);
    }

    #[test]
    fn answering_means_an_answer_lately_and_one_lost_probe_does_not_matter() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        let t0 = Instant::now();
        assert!(!live.answering(t0), "never answered");
        live.sent(t0);
        live.answered(t0 + Duration::from_millis(5));
        assert!(live.answering(t0 + TICK));
        // The next probe is lost: still answering one tick later.
        live.sent(t0 + TICK);
        assert!(live.answering(t0 + TICK * 2));
        // Two in a row: no longer.
        live.sent(t0 + TICK * 2);
        assert!(!live.answering(t0 + TICK * 3));
        assert!(live.alive(), "not dead for all that");
    }

    #[test]
    fn a_slow_prober_needs_three_unanswered_probes() {
        let mut live = Liveness::new(DEFAULT_PARAMS);
        let t0 = Instant::now();
        live.sent(t0 - Duration::from_secs(1));
        live.answered(t0 - Duration::from_secs(1));
        // One probe every 2 s, unanswered: dead only at the third.
        for k in 0..3u32 {
            let now = t0 + Duration::from_secs(2) * k;
            live.sent(now);
            let change = live.update(now + Duration::from_millis(700));
            assert_eq!(change, (k == 2).then_some(false), "probe {k}");
        }
    }

    proptest! {
        /// Whatever the answers: the state changes alternate, and a target
        /// probed every 200 ms is never alive 1 s after its last answer (3 s
        /// after the first probe if it never answered).
        #[test]
        fn the_rule_holds_for_any_answers(answers in proptest::collection::vec(any::<bool>(), 1..300)) {
            let mut live = Liveness::new(DEFAULT_PARAMS);
            let t0 = Instant::now();
            let mut state = true;
            let mut last_answer: Option<u32> = None;
            for (k, answered) in answers.iter().enumerate() {
                let k = k as u32;
                let now = t0 + TICK * k;
                live.sent(now);
                if *answered {
                    live.answered(now + Duration::from_millis(5));
                    last_answer = Some(k);
                }
                if let Some(change) = live.update(now + Duration::from_millis(10)) {
                    prop_assert_ne!(change, state, "tick {}: the same state twice", k);
                    state = change;
                }
                let ticks_since = match last_answer {
                    Some(l) => k - l,
                    None => k + 1,
                };
                // Within 1 s of the last answer; never heard: within the
                // 3 s grace.
                let bound = if last_answer.is_some() { 4 } else { 15 };
                if state {
                    prop_assert!(ticks_since <= bound, "tick {}: alive {} ticks after the last answer", k, ticks_since);
                }
            }
        }
    }
}
