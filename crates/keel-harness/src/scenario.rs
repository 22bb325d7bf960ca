//! Scenarios: named, seeded, scale-parameterised units, each with the seed
//! test it covers and that seed's threshold beside keel's own target; the
//! plan one master seed expands into; and what a scenario measured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::Error;
use crate::fixture::{Relay, RelayOptions, RelayProcess, RemoteRelay, Resources, Target};
use crate::history::Recorder;
use crate::load::Latency;
use crate::threshold::Threshold;

/// Which suite a scenario belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Suite {
    /// `cargo xtask load`.
    Load,
    /// `cargo xtask chaos`.
    Chaos,
    /// `cargo xtask chaos --cluster`: several nodes on PostgreSQL and NATS.
    Cluster,
}

impl Suite {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Load => "load",
            Suite::Chaos => "chaos",
            Suite::Cluster => "cluster",
        }
    }

    /// The `cargo xtask` arguments that run it.
    pub fn command(self) -> &'static str {
        match self {
            Suite::Load => "load",
            Suite::Chaos => "chaos",
            Suite::Cluster => "chaos --cluster",
        }
    }
}

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Scale {
    /// Each scenario's small size: what `cargo test` runs.
    Small,
    /// The sizes the seeds and keel's targets name.
    Full,
    /// A fraction (or multiple) of full.
    Factor(f64),
}

impl Scale {
    /// `small` at small scale, `full` at full, `full * f` otherwise (at least 1).
    pub fn pick(self, small: usize, full: usize) -> usize {
        match self {
            Scale::Small => small,
            Scale::Full => full,
            Scale::Factor(f) => ((full as f64 * f).round() as usize).max(1),
        }
    }

    /// [`Scale::pick`] for durations.
    pub fn duration(self, small: Duration, full: Duration) -> Duration {
        match self {
            Scale::Small => small,
            Scale::Full => full,
            Scale::Factor(f) => full.mul_f64(f).max(Duration::from_millis(100)),
        }
    }

    /// As given on the command line (`small`, `full` or the factor).
    pub fn label(self) -> String {
        match self {
            Scale::Small => "small".into(),
            Scale::Full => "full".into(),
            Scale::Factor(f) => format!("{f}"),
        }
    }
}

impl std::str::FromStr for Scale {
    type Err = String;

    fn from_str(s: &str) -> Result<Scale, String> {
        match s {
            "small" => Ok(Scale::Small),
            "full" => Ok(Scale::Full),
            n => match n.parse::<f64>() {
                Ok(f) if f > 0.0 && f.is_finite() => Ok(Scale::Factor(f)),
                _ => Err(format!(
                    "scale {n:?}: expected small, full, or a factor of full such as 0.25"
                )),
            },
        }
    }
}

/// The seed test a scenario covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeedRef {
    /// The seed file's number in `shared/seeds/` (`000` ... `004`).
    pub seed: &'static str,
    /// The seed's test name.
    pub test: &'static str,
    /// The seed's threshold, in its words.
    pub threshold: &'static str,
}

/// One timed action of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Action {
    /// When, from the start of the scenario's load.
    pub at_ms: u64,
    /// For how long (0 for instant actions).
    pub duration_ms: u64,
    /// What (`publish`, `slow_reader`, `command`, `kill9`, ...).
    pub kind: String,
    /// On what (a client, a channel, the relay).
    pub target: String,
    /// Details.
    pub params: serde_json::Value,
}

/// Everything one scenario run will do, expanded from the master seed:
/// data, printed at the start, saved as `plan.json`, replayable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The scenario.
    pub scenario: String,
    /// The master seed.
    pub seed: u64,
    /// The scale.
    pub scale: String,
    /// Sizes, rates and durations.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Timed actions, in time order.
    pub actions: Vec<Action>,
}

impl Plan {
    /// A numeric parameter.
    pub fn num(&self, key: &str) -> f64 {
        self.params
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    }

    /// A count parameter.
    pub fn count(&self, key: &str) -> usize {
        self.num(key) as usize
    }

    /// The plan as pretty JSON (what `plan.json` holds).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A few lines for the terminal: parameters, then the first actions.
    pub fn summary(&self, max_actions: usize) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut out = format!(
            "plan {} seed {} scale {}: {}; {} actions",
            self.scenario,
            self.seed,
            self.scale,
            params.join(" "),
            self.actions.len()
        );
        for a in self.actions.iter().take(max_actions) {
            out.push_str(&format!(
                "\n  t+{}ms {} {} {}",
                a.at_ms, a.kind, a.target, a.params
            ));
        }
        if self.actions.len() > max_actions {
            out.push_str(&format!(
                "\n  ... {} more in plan.json",
                self.actions.len() - max_actions
            ));
        }
        out
    }
}

/// What a plan is expanded from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanInput {
    /// The master seed.
    pub seed: u64,
    /// The scale.
    pub scale: Scale,
    /// `--duration`, for scenarios whose length is a choice.
    pub duration: Option<Duration>,
    /// `--iterations`, for scenarios that repeat a fault.
    pub iterations: Option<usize>,
}

impl PlanInput {
    /// A random generator for one named part of the plan, seeded from the
    /// master seed and the name (so adding a part never shifts another).
    pub fn rng(&self, scenario: &str, part: &str) -> StdRng {
        StdRng::seed_from_u64(sub_seed(self.seed, &format!("{scenario}/{part}")))
    }

    /// A plan with these parameters and no actions yet.
    pub fn plan(&self, scenario: &str, params: &[(&str, serde_json::Value)]) -> Plan {
        Plan {
            scenario: scenario.to_owned(),
            seed: self.seed,
            scale: self.scale.label(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            actions: Vec::new(),
        }
    }
}

/// SplitMix64 over the seed and an FNV-1a hash of `name`: stable across
/// builds and platforms (unlike `std`'s hasher).
pub fn sub_seed(seed: u64, name: &str) -> u64 {
    let mut z = seed ^ crate::history::fnv64(name.as_bytes());
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a scenario measured (its invariants are checked from the history).
#[derive(Debug, Default)]
pub struct Measured {
    /// Named figures; thresholds refer to them.
    pub metrics: BTreeMap<String, f64>,
    /// Latency over time, for the chart (publish-to-ack or publish-to-deliver).
    pub latency: Option<Latency>,
    /// Operations per second over time: (second, rate).
    pub throughput: Vec<(f64, f64)>,
    /// Lines for the report.
    pub notes: Vec<String>,
}

impl Measured {
    /// Sets a metric.
    pub fn set(&mut self, name: &str, value: f64) -> &mut Self {
        self.metrics.insert(name.to_owned(), value);
        self
    }

    /// Adds a note.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }
}

/// What a running scenario is given.
#[derive(Debug)]
pub struct Ctx {
    /// What to run against.
    pub target: Target,
    /// Where operations and deliveries are recorded.
    pub recorder: Recorder,
    /// Resource samples of the relays this scenario starts.
    pub resources: Resources,
    /// This scenario's directory in the run (logs go there).
    pub dir: PathBuf,
    /// The scale.
    pub scale: Scale,
    phase: std::sync::Arc<Mutex<String>>,
    relays: Mutex<u32>,
    relay_env: Vec<(String, String)>,
    run_tag: String,
}

impl Ctx {
    /// A context writing into `dir`.
    pub fn new(target: Target, dir: &Path, scale: Scale) -> Ctx {
        Ctx {
            target,
            recorder: Recorder::new(),
            resources: Resources::default(),
            dir: dir.to_path_buf(),
            scale,
            phase: std::sync::Arc::new(Mutex::new("starting".into())),
            relays: Mutex::new(0),
            relay_env: Vec::new(),
            run_tag: run_tag(),
        }
    }

    /// Whether clients talk to a relay this harness started, with nothing
    /// in between (so that what the relay answers is the relay's). False
    /// for `--target`: whatever is at that URL may be a proxy, a load
    /// balancer or a TLS terminator.
    pub fn direct(&self) -> bool {
        matches!(self.target, Target::Spawn(_))
    }

    /// `name`, made unique to this run for `--target` (a tag from the wall
    /// clock appended), so that a long-lived relay's channels of an earlier
    /// run, even one with the same seed, are never read as this run's; as
    /// it is for a relay this run started.
    pub fn unique(&self, name: &str) -> String {
        match self.target {
            Target::Spawn(_) => name.to_owned(),
            Target::Url(_) => format!("{name}-{}", self.run_tag),
        }
    }

    /// Adds environment for every relay this context starts (the checker's
    /// self-test arms failpoints this way).
    pub fn with_relay_env(mut self, env: &[(&str, &str)]) -> Ctx {
        self.relay_env
            .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// Says what the scenario is doing now (shown live).
    pub fn phase(&self, phase: &str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.to_owned();
    }

    /// What the scenario is doing now, readable from another task.
    pub fn phase_handle(&self) -> std::sync::Arc<Mutex<String>> {
        self.phase.clone()
    }

    /// Starts a relay process for this scenario (its log is
    /// `relay-<n>.log` in the scenario's directory). Refused with `--target`.
    pub async fn relay(&self, mut options: RelayOptions) -> Result<RelayProcess, Error> {
        options.env.extend(self.relay_env.iter().cloned());
        let Target::Spawn(binary) = &self.target else {
            return Err(Error::NotApplicable(
                "this scenario starts its own relay; it cannot run against --target".into(),
            ));
        };
        let n = {
            let mut n = self.relays.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        RelayProcess::start(
            binary,
            options,
            &self.dir.join(format!("relay-{n}.log")),
            &self.resources,
            tokio::time::Instant::from_std(self.recorder.epoch()),
        )
        .await
    }

    /// A relay to talk to: the `--target` URL, or a fresh process (kept in
    /// the returned guard; `None` with `--target`).
    pub async fn endpoint(
        &self,
        options: RelayOptions,
    ) -> Result<(String, Option<RelayProcess>), Error> {
        match &self.target {
            Target::Url(remote) => Ok((remote.url.clone(), None)),
            Target::Spawn(_) => {
                let relay = self.relay(options).await?;
                Ok((relay.url(), Some(relay)))
            }
        }
    }

    /// The relay to load and measure: a fresh process started with
    /// `options`, or the `--target` relay (then `options` must be the
    /// defaults: a relay someone else runs has its own configuration),
    /// whose figures come from its `/metrics`.
    pub async fn measured_relay(&self, options: RelayOptions) -> Result<Relay, Error> {
        match &self.target {
            Target::Spawn(_) => Ok(Relay::Spawned(Box::new(self.relay(options).await?))),
            Target::Url(_)
                if !options.config.is_empty()
                    || options.upstream.is_some()
                    || options.spool.is_some()
                    || !options.env.is_empty()
                    || options.data.is_some() =>
            {
                Err(Error::NotApplicable(
                    "this scenario configures the relay it measures; it cannot run against --target"
                        .into(),
                ))
            }
            Target::Url(remote) => Ok(Relay::Remote(
                RemoteRelay::start(
                    remote,
                    &self.resources,
                    tokio::time::Instant::from_std(self.recorder.epoch()),
                )
                .await?,
            )),
        }
    }
}

fn run_tag() -> String {
    let mut n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut tag = Vec::new();
    while n > 0 {
        tag.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    tag.reverse();
    String::from_utf8(tag).unwrap_or_default()
}

/// A scenario's body: runs its plan against the context.
pub type RunFn = for<'a> fn(&'a Ctx, &'a Plan) -> BoxFuture<'a, Result<Measured, Error>>;

/// One scenario of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name (`--scenario`).
    pub name: &'static str,
    /// Its suite.
    pub suite: Suite,
    /// The seed test it covers.
    pub seed: SeedRef,
    /// What it does, in one line.
    pub what: &'static str,
    /// keel's own target, in words.
    pub target: &'static str,
    /// Why it must start, kill or inspect the relay process itself (then
    /// it is not applicable to `--target`); `None` when it runs against any
    /// relay by its URL.
    pub needs_process: Option<&'static str>,
    /// Its thresholds, for a plan (a floor may depend on the sizes).
    pub thresholds: fn(&Plan) -> Vec<Threshold>,
    /// Expands the plan (pure: same input, same plan).
    pub plan: fn(&PlanInput) -> Plan,
    /// Runs it.
    pub run: RunFn,
    /// How long a full-scale run may take before it is a harness error.
    pub budget: Duration,
}

impl Scenario {
    /// The one-line command that reproduces a run of it.
    pub fn repro(&self, seed: u64, scale: Scale) -> String {
        format!(
            "cargo xtask {} --scenario {} --seed {seed} --scale {}",
            self.suite.command(),
            self.name,
            scale.label()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_parse_and_pick() {
        assert_eq!("small".parse::<Scale>(), Ok(Scale::Small));
        assert_eq!("0.5".parse::<Scale>(), Ok(Scale::Factor(0.5)));
        assert!("-1".parse::<Scale>().is_err());
        assert_eq!(Scale::Factor(0.5).pick(10, 1000), 500);
        assert_eq!(Scale::Small.pick(10, 1000), 10);
    }

    #[test]
    fn sub_seeds_are_stable_and_distinct() {
        assert_eq!(sub_seed(42, "a/b"), sub_seed(42, "a/b"));
        assert_ne!(sub_seed(42, "a/b"), sub_seed(42, "a/c"));
        assert_ne!(sub_seed(42, "a/b"), sub_seed(43, "a/b"));
    }
}
