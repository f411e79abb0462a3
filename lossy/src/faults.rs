//! What happens to datagrams going one way: [`Faults`], and [`decide`] for one datagram.

use std::time::Duration;

use crate::rng::Rng;

/// How long a reordered datagram is held back by default: long enough for the next few
/// datagrams of a burst to overtake it, short against every protocol timer (the fastest, the UDP
/// SDK's 3-s keep-alive).
pub const DEFAULT_REORDER_HOLD: Duration = Duration::from_millis(30);

/// Faults applied to the datagrams of one direction. `Default` is a perfect link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Probability that a datagram is dropped, in `[0, 1]`.
    pub drop: f64,
    /// Probability that a datagram that is not dropped is sent twice, in `[0, 1]`.
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_hold`, letting later ones overtake
    /// it, in `[0, 1]`.
    pub reorder: f64,
    /// See `reorder`.
    pub reorder_hold: Duration,
    /// Fixed delay of every datagram.
    pub delay: Duration,
    /// Extra uniform random delay in `[0, jitter]` per copy (copies may then swap places too).
    pub jitter: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_hold: DEFAULT_REORDER_HOLD,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }
}

impl Faults {
    /// A link that drops a fraction `p` of datagrams and nothing else.
    pub fn dropping(p: f64) -> Self {
        Self {
            drop: p,
            ..Self::default()
        }
    }
}

/// The fate of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Never sent.
    Dropped,
    /// Sent once after `delay`.
    Sent {
        /// Delay before sending.
        delay: Duration,
        /// It was held back to be overtaken.
        reordered: bool,
    },
    /// Sent twice, after each delay.
    Duplicated {
        /// Delay before the first copy.
        first: Duration,
        /// Delay before the second copy.
        second: Duration,
        /// The first copy was held back to be overtaken.
        reordered: bool,
    },
}

/// Decides what becomes of one datagram under `faults`. A `spared` datagram (among the first
/// ones of its flow) goes through at once, untouched, and draws nothing from `rng`.
pub fn decide(rng: &mut Rng, faults: &Faults, spared: bool) -> Fate {
    if spared {
        return Fate::Sent {
            delay: Duration::ZERO,
            reordered: false,
        };
    }
    if rng.chance(faults.drop) {
        return Fate::Dropped;
    }
    let reordered = rng.chance(faults.reorder);
    let hold = if reordered {
        faults.reorder_hold
    } else {
        Duration::ZERO
    };
    let first = faults.delay + rng.up_to(faults.jitter) + hold;
    if rng.chance(faults.duplicate) {
        let second = faults.delay + rng.up_to(faults.jitter);
        return Fate::Duplicated {
            first,
            second,
            reordered,
        };
    }
    Fate::Sent {
        delay: first,
        reordered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_link_sends_everything_at_once() {
        let mut rng = Rng::new(3);
        for _ in 0..100 {
            assert_eq!(
                decide(&mut rng, &Faults::default(), false),
                Fate::Sent {
                    delay: Duration::ZERO,
                    reordered: false
                }
            );
        }
    }

    #[test]
    fn spared_datagrams_are_untouched() {
        let mut rng = Rng::new(3);
        let all_bad = Faults {
            drop: 1.0,
            delay: Duration::from_secs(1),
            ..Faults::default()
        };
        let fate = decide(&mut rng, &all_bad, true);
        assert!(matches!(fate, Fate::Sent { delay, .. } if delay.is_zero()));
        assert_eq!(decide(&mut rng, &all_bad, false), Fate::Dropped);
    }

    #[test]
    fn rates_follow_the_probabilities() {
        let mut rng = Rng::new(4);
        let faults = Faults {
            drop: 0.1,
            duplicate: 0.2,
            reorder: 0.05,
            ..Faults::default()
        };
        let (mut dropped, mut dup, mut reordered) = (0, 0, 0);
        for _ in 0..100_000 {
            match decide(&mut rng, &faults, false) {
                Fate::Dropped => dropped += 1,
                Fate::Sent { reordered: r, .. } => reordered += usize::from(r),
                Fate::Duplicated { reordered: r, .. } => {
                    dup += 1;
                    reordered += usize::from(r);
                }
            }
        }
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
        // 20 % of the 90 % not dropped.
        assert!((16_500..19_500).contains(&dup), "{dup}");
        assert!((4_000..5_000).contains(&reordered), "{reordered}");
    }

    #[test]
    fn delays_add_up() {
        let mut rng = Rng::new(5);
        let faults = Faults {
            reorder: 1.0,
            reorder_hold: Duration::from_millis(30),
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(5),
            duplicate: 1.0,
            ..Faults::default()
        };
        for _ in 0..1000 {
            let Fate::Duplicated { first, second, .. } = decide(&mut rng, &faults, false) else {
                panic!("duplicate = 1");
            };
            assert!(first >= Duration::from_millis(40) && first <= Duration::from_millis(45));
            assert!(second >= Duration::from_millis(10) && second <= Duration::from_millis(15));
        }
    }

    #[test]
    fn same_seed_same_fates() {
        let faults = Faults {
            drop: 0.3,
            duplicate: 0.3,
            jitter: Duration::from_millis(3),
            ..Faults::default()
        };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..500)
                .map(|_| decide(&mut rng, &faults, false))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }
}
