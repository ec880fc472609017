//! Seeded arrival schedules: when each benchmark request is meant to be sent, on the run clock.
//!
//! Patterns follow vLLM's `benchmark_serving` (request rate `inf` = burst; otherwise gamma-distributed
//! gaps with shape = burstiness and scale = 1 / (rate * burstiness), so burstiness 1 is Poisson) and
//! inference-perf's staged load (a list of rate x duration stages, run back to back).

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp, Gamma};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    #[error("request rate must be a positive finite number, got {0}")]
    BadRate(f64),
    #[error("burstiness must be a positive finite number, got {0}")]
    BadBurstiness(f64),
    #[error("burst window must be >= 0 seconds, got {0}")]
    BadWindow(f64),
    #[error("stage {index}: duration must be > 0 seconds, got {duration_s}")]
    BadStageDuration { index: usize, duration_s: f64 },
    #[error("a staged load needs at least one stage")]
    NoStages,
}

/// How gaps inside a stage are drawn (inference-perf's `load.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StageArrival {
    /// Evenly spaced at 1/rate.
    Constant,
    /// Exponential gaps with mean 1/rate.
    #[default]
    Poisson,
}

/// One stage of a staged load: `rate` requests/s for `duration_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub rate: f64,
    pub duration_s: f64,
}

/// The arrival process of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ArrivalPattern {
    /// Every request at t = 0 (`window_s == 0`), or evenly spread over `[0, window_s)`.
    Burst { window_s: f64 },
    /// One request every 1/rate seconds.
    Constant { rate: f64 },
    /// Gamma gaps, shape = burstiness, scale = 1/(rate*burstiness); burstiness 1 = Poisson.
    Gamma { rate: f64, burstiness: f64 },
    /// Stages run back to back; a constant stage sends round(rate * duration) requests, a Poisson
    /// stage as many as its arrivals that fall inside it (rate * duration on average).
    Stages {
        stages: Vec<Stage>,
        arrival: StageArrival,
    },
}

impl ArrivalPattern {
    /// Poisson arrivals at `rate` requests/s.
    pub fn poisson(rate: f64) -> Self {
        ArrivalPattern::Gamma {
            rate,
            burstiness: 1.0,
        }
    }

    /// vLLM's `--request-rate` / `--burstiness` pair (`rate = inf` means burst).
    pub fn from_vllm(rate: f64, burstiness: f64) -> Self {
        if rate.is_infinite() && rate > 0.0 {
            ArrivalPattern::Burst { window_s: 0.0 }
        } else {
            ArrivalPattern::Gamma { rate, burstiness }
        }
    }
}

/// One scheduled request: when to send it and which stage it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Arrival {
    pub at_s: f64,
    /// Stage index for staged loads; None otherwise.
    pub stage: Option<usize>,
}

/// The full arrival schedule, sorted by time, starting at t = 0.
///
/// `num_requests` is ignored by staged loads (their stages fix the count).
pub fn schedule(
    pattern: &ArrivalPattern,
    num_requests: usize,
    seed: u64,
) -> Result<Vec<Arrival>, WorkloadError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plain = |at_s: f64| Arrival { at_s, stage: None };
    match pattern {
        ArrivalPattern::Burst { window_s } => {
            if !window_s.is_finite() || *window_s < 0.0 {
                return Err(WorkloadError::BadWindow(*window_s));
            }
            let n = num_requests.max(1) as f64;
            Ok((0..num_requests)
                .map(|i| plain(window_s * i as f64 / n))
                .collect())
        }
        ArrivalPattern::Constant { rate } => {
            check_rate(*rate)?;
            Ok((0..num_requests).map(|i| plain(i as f64 / rate)).collect())
        }
        ArrivalPattern::Gamma { rate, burstiness } => {
            check_rate(*rate)?;
            if !burstiness.is_finite() || *burstiness <= 0.0 {
                return Err(WorkloadError::BadBurstiness(*burstiness));
            }
            let gamma = Gamma::new(*burstiness, 1.0 / (rate * burstiness))
                .map_err(|_| WorkloadError::BadBurstiness(*burstiness))?;
            // vLLM yields the first request at once, then sleeps one gap before each next one.
            let mut t = 0.0;
            let mut out = Vec::with_capacity(num_requests);
            for i in 0..num_requests {
                if i > 0 {
                    t += gamma.sample(&mut rng);
                }
                out.push(plain(t));
            }
            Ok(out)
        }
        ArrivalPattern::Stages { stages, arrival } => {
            if stages.is_empty() {
                return Err(WorkloadError::NoStages);
            }
            let mut out = Vec::new();
            let mut stage_start = 0.0;
            for (index, st) in stages.iter().enumerate() {
                check_rate(st.rate)?;
                if !st.duration_s.is_finite() || st.duration_s <= 0.0 {
                    return Err(WorkloadError::BadStageDuration {
                        index,
                        duration_s: st.duration_s,
                    });
                }
                match arrival {
                    StageArrival::Constant => {
                        let count = (st.rate * st.duration_s).round() as usize;
                        for i in 0..count {
                            let at = i as f64 / st.rate;
                            out.push(Arrival {
                                at_s: stage_start + at,
                                stage: Some(index),
                            });
                        }
                    }
                    StageArrival::Poisson => {
                        // A Poisson process over the stage: first request at its start, then
                        // exponential gaps until the stage ends (never spilling into the next).
                        let exp = Exp::new(st.rate).map_err(|_| WorkloadError::BadRate(st.rate))?;
                        let mut t = 0.0;
                        while t < st.duration_s {
                            out.push(Arrival {
                                at_s: stage_start + t,
                                stage: Some(index),
                            });
                            t += exp.sample(&mut rng);
                        }
                    }
                }
                stage_start += st.duration_s;
            }
            Ok(out)
        }
    }
}

fn check_rate(rate: f64) -> Result<(), WorkloadError> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(WorkloadError::BadRate(rate))
    }
}

/// Gaps between consecutive arrivals (length n - 1).
pub fn gaps(arrivals: &[Arrival]) -> Vec<f64> {
    arrivals.windows(2).map(|w| w[1].at_s - w[0].at_s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_cv(x: &[f64]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt() / mean)
    }

    /// Kolmogorov-Smirnov statistic of `x` against the CDF `f`.
    fn ks(mut x: Vec<f64>, f: impl Fn(f64) -> f64) -> f64 {
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = x.len() as f64;
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = f(v);
                (c - i as f64 / n)
                    .abs()
                    .max((((i + 1) as f64) / n - c).abs())
            })
            .fold(0.0, f64::max)
    }

    /// KS critical value at alpha = 0.001.
    fn ks_crit(n: usize) -> f64 {
        1.95 / (n as f64).sqrt()
    }

    #[test]
    fn poisson_gaps_are_exponential() {
        let rate = 8.0;
        let a = schedule(&ArrivalPattern::poisson(rate), 20_001, 7).unwrap();
        assert_eq!(a[0].at_s, 0.0);
        let g = gaps(&a);
        let (mean, cv) = mean_cv(&g);
        assert!((mean - 1.0 / rate).abs() < 0.03 / rate, "mean {mean}");
        assert!((cv - 1.0).abs() < 0.03, "cv {cv}");
        let d = ks(g.clone(), |x| 1.0 - (-rate * x).exp());
        assert!(d < ks_crit(g.len()), "KS D = {d}");
        // A wrong rate must be rejected by the same check (the test can fail).
        let d_wrong = ks(g.clone(), |x| 1.0 - (-rate * 1.1 * x).exp());
        assert!(d_wrong > ks_crit(g.len()), "KS D(wrong) = {d_wrong}");
    }

    #[test]
    fn gamma_gaps_follow_vllm_burstiness() {
        // shape k = burstiness, scale = 1/(rate*k): mean 1/rate, CV 1/sqrt(k).
        let (rate, k) = (5.0, 2.0);
        let a = schedule(
            &ArrivalPattern::Gamma {
                rate,
                burstiness: k,
            },
            20_001,
            11,
        )
        .unwrap();
        let g = gaps(&a);
        let (mean, cv) = mean_cv(&g);
        assert!((mean - 1.0 / rate).abs() < 0.02 / rate, "mean {mean}");
        assert!((cv - 1.0 / k.sqrt()).abs() < 0.02, "cv {cv}");
        // Shape 2 is Erlang-2: CDF = 1 - e^{-lx}(1 + lx), l = 1/scale = rate*k.
        let l = rate * k;
        let d = ks(g.clone(), |x| 1.0 - (-l * x).exp() * (1.0 + l * x));
        assert!(d < ks_crit(g.len()), "KS D = {d}");
        // Bursty traffic (k < 1) has CV > 1.
        let a = schedule(
            &ArrivalPattern::Gamma {
                rate,
                burstiness: 0.25,
            },
            20_001,
            3,
        )
        .unwrap();
        let (_, cv) = mean_cv(&gaps(&a));
        assert!((cv - 2.0).abs() < 0.1, "cv {cv}");
    }

    #[test]
    fn same_seed_same_schedule_other_seed_differs() {
        let p = ArrivalPattern::Gamma {
            rate: 3.0,
            burstiness: 0.5,
        };
        let a = schedule(&p, 100, 42).unwrap();
        assert_eq!(a, schedule(&p, 100, 42).unwrap());
        assert_ne!(a, schedule(&p, 100, 43).unwrap());
    }

    #[test]
    fn burst_and_constant_are_exact() {
        let a = schedule(&ArrivalPattern::Burst { window_s: 0.0 }, 5, 0).unwrap();
        assert!(a.iter().all(|x| x.at_s == 0.0));
        let a = schedule(&ArrivalPattern::Burst { window_s: 2.0 }, 4, 0).unwrap();
        assert_eq!(
            a.iter().map(|x| x.at_s).collect::<Vec<_>>(),
            vec![0.0, 0.5, 1.0, 1.5]
        );
        let a = schedule(&ArrivalPattern::Constant { rate: 4.0 }, 3, 0).unwrap();
        assert_eq!(
            a.iter().map(|x| x.at_s).collect::<Vec<_>>(),
            vec![0.0, 0.25, 0.5]
        );
        assert_eq!(
            ArrivalPattern::from_vllm(f64::INFINITY, 1.0),
            ArrivalPattern::Burst { window_s: 0.0 }
        );
    }

    #[test]
    fn stages_run_back_to_back() {
        let stages = vec![
            Stage {
                rate: 2.0,
                duration_s: 3.0,
            },
            Stage {
                rate: 10.0,
                duration_s: 1.0,
            },
        ];
        let a = schedule(
            &ArrivalPattern::Stages {
                stages: stages.clone(),
                arrival: StageArrival::Constant,
            },
            0,
            0,
        )
        .unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(
            a[5],
            Arrival {
                at_s: 2.5,
                stage: Some(0)
            }
        );
        assert_eq!(
            a[6],
            Arrival {
                at_s: 3.0,
                stage: Some(1)
            }
        );
        assert!((a[15].at_s - 3.9).abs() < 1e-12);
        // Poisson stages: each stage's arrivals stay inside it, rate roughly honoured.
        let long = vec![
            Stage {
                rate: 50.0,
                duration_s: 100.0,
            },
            Stage {
                rate: 200.0,
                duration_s: 50.0,
            },
        ];
        let a = schedule(
            &ArrivalPattern::Stages {
                stages: long,
                arrival: StageArrival::Poisson,
            },
            0,
            9,
        )
        .unwrap();
        let s0: Vec<_> = a.iter().filter(|x| x.stage == Some(0)).collect();
        let s1: Vec<_> = a.iter().filter(|x| x.stage == Some(1)).collect();
        assert!(s0.iter().all(|x| x.at_s < 100.0) && s1.iter().all(|x| x.at_s >= 100.0));
        assert!((s0.len() as f64 - 5000.0).abs() < 200.0, "{}", s0.len());
        assert!((s1.len() as f64 - 10_000.0).abs() < 300.0, "{}", s1.len());
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert_eq!(
            schedule(&ArrivalPattern::Constant { rate: 0.0 }, 3, 0),
            Err(WorkloadError::BadRate(0.0))
        );
        assert!(schedule(
            &ArrivalPattern::Gamma {
                rate: 1.0,
                burstiness: -1.0
            },
            3,
            0
        )
        .is_err());
        assert!(schedule(&ArrivalPattern::Burst { window_s: f64::NAN }, 3, 0).is_err());
        assert_eq!(
            schedule(
                &ArrivalPattern::Stages {
                    stages: vec![],
                    arrival: StageArrival::Poisson
                },
                3,
                0
            ),
            Err(WorkloadError::NoStages)
        );
    }
}
