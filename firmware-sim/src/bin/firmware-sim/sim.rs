//! The simulated board: sensors (temperature as a random walk that a heater relay pulls
//! toward the setpoint, humidity, a draining battery, a sample counter), actuators (led,
//! relay, setpoint, set-interval, reboot) driven by hub commands and reported as readings,
//! and a seeded RNG (the library's [`MaskRng`]). Events go to an [`EventSink`] (fleet counters or `run`'s log).

use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use firmware_sim::{Board, CommandContext, Event, MaskRng, Outcome, Samples};
use rand_core::RngCore;
use schemas::Command;

/// Every sensor the board has, in reading order, with its metric name.
pub const SENSORS: [&str; 7] = [
    "temperature",
    "humidity",
    "battery",
    "counter",
    "led",
    "relay",
    "setpoint",
];
/// Commands the board understands.
pub const COMMANDS: &str = "led, relay, setpoint, set-interval, reboot";

// errno-style result codes, so that scripts can tell failures apart.
const ENOSYS: i32 = 38;
const EINVAL: i32 = 22;
const ETIME: i32 = 62;

/// Which sensors are reported, parsed from a comma-separated list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorSet(u8);

impl SensorSet {
    /// All of them.
    pub const ALL: SensorSet = SensorSet(0x7F);

    /// Parses `temperature,humidity,...` (or `all`).
    ///
    /// # Errors
    /// An unknown name, with the list of valid ones.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<SensorSet, String> {
        let mut bits = 0u8;
        for name in names {
            let name = name.as_ref().trim();
            if name == "all" {
                return Ok(SensorSet::ALL);
            }
            let i = SENSORS.iter().position(|s| *s == name).ok_or_else(|| {
                format!(
                    "unknown sensor `{name}` (valid: {}, all)",
                    SENSORS.join(", ")
                )
            })?;
            bits |= 1 << i;
        }
        if bits == 0 {
            return Err("no sensors selected".into());
        }
        Ok(SensorSet(bits))
    }

    fn has(self, name: &str) -> bool {
        SENSORS
            .iter()
            .position(|s| *s == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    /// The names, for an image.
    pub fn names(self) -> Vec<String> {
        SENSORS
            .iter()
            .filter(|s| self.has(s))
            .map(|s| s.to_string())
            .collect()
    }
}

/// A seed from OS randomness (std's `RandomState`) and the clock, mixed with `salt` (the
/// device's index), so that every device and every run differs. It seeds the library's
/// generator ([`MaskRng`]), which then seeds each boot's board and client.
pub fn entropy_seed(salt: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A uniform number in `[-1, 1)` from the top 53 bits of `rng`'s next output.
fn symmetric(rng: &mut MaskRng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// Where a board reports its events.
pub trait EventSink: Send + Sync {
    /// `device` (its index among the process's devices, and its id) saw `event`.
    fn event(&self, index: usize, device: &str, event: &Event<'_>);

    /// The hub welcomed `device` for the first time since the process started (called
    /// before the `Welcome` event).
    fn first_welcome(&self, index: usize, device: &str) {
        let _ = (index, device);
    }

    /// The device reset itself (a `reboot` command) and boots again from its flash with
    /// `next_seq` as its next sequence number and `pending` unacknowledged batches.
    fn rebooted(&self, index: usize, device: &str, next_seq: u64, pending: usize) {
        let _ = (index, device, next_seq, pending);
    }
}

/// The simulated hardware of one device. About 100 bytes plus the shared sink.
pub struct SimBoard {
    index: usize,
    id: Arc<str>,
    sensors: SensorSet,
    rng: MaskRng,
    temperature: f64,
    humidity: f64,
    battery: f64,
    counter: u64,
    led: bool,
    relay: bool,
    setpoint: f64,
    /// Whether the hub has ever welcomed this device (kept across simulated reboots).
    pub welcomed_once: bool,
    sink: Arc<dyn EventSink>,
    /// The firmware partition's updater, when the device takes updates.
    pub updater: Option<firmware_sim::update::Updater<crate::partition::PartitionFlash>>,
}

impl SimBoard {
    /// A freshly reset board. Actuators start off; the sensors start from plausible values
    /// that differ per device.
    pub fn new(
        index: usize,
        id: Arc<str>,
        sensors: SensorSet,
        mut rng: MaskRng,
        sink: Arc<dyn EventSink>,
    ) -> SimBoard {
        let temperature = 21.0 + symmetric(&mut rng) * 2.0;
        let humidity = 45.0 + symmetric(&mut rng) * 10.0;
        let battery = 3.9 + symmetric(&mut rng) * 0.3;
        SimBoard {
            index,
            id,
            sensors,
            rng,
            temperature,
            humidity,
            battery,
            counter: 0,
            led: false,
            relay: false,
            setpoint: 21.0,
            welcomed_once: false,
            sink,
            updater: None,
        }
    }

    /// The LED state (for tests and the status of `run`).
    #[cfg(test)]
    pub fn led(&self) -> bool {
        self.led
    }

    fn step_physics(&mut self) {
        // The relay drives a heater toward the setpoint; otherwise the room drifts toward
        // 20 °C with noise.
        let target = if self.relay { self.setpoint } else { 20.0 };
        self.temperature += (target - self.temperature) * 0.05 + symmetric(&mut self.rng) * 0.15;
        self.temperature = self.temperature.clamp(-20.0, 60.0);
        self.humidity = (self.humidity + symmetric(&mut self.rng) * 0.5).clamp(10.0, 95.0);
        let drain =
            0.0004 + if self.led { 0.0008 } else { 0.0 } + if self.relay { 0.001 } else { 0.0 };
        self.battery -= drain;
        if self.battery < 3.3 {
            // Someone swapped the battery.
            self.battery = 4.2;
        }
        self.counter += 1;
    }

    fn switch(&mut self, name: &str, args: &serde_json::Value) -> Result<String, String> {
        let on = parse_on(args).ok_or_else(|| {
            format!(r#"{name} needs {{"on": true|false}} (or {{"state": "on"|"off"}})"#)
        })?;
        let slot = if name == "led" {
            &mut self.led
        } else {
            &mut self.relay
        };
        *slot = on;
        Ok(format!("{name} {}", if on { "on" } else { "off" }))
    }
}

fn parse_on(args: &serde_json::Value) -> Option<bool> {
    for key in ["on", "state", "value"] {
        match args.get(key) {
            Some(serde_json::Value::Bool(b)) => return Some(*b),
            Some(serde_json::Value::String(s)) => match s.as_str() {
                "on" | "true" | "1" => return Some(true),
                "off" | "false" | "0" => return Some(false),
                _ => return None,
            },
            Some(serde_json::Value::Number(n)) => return n.as_f64().map(|v| v != 0.0),
            Some(_) => return None,
            None => {}
        }
    }
    None
}

fn parse_interval_ms(args: &serde_json::Value) -> Option<u64> {
    if let Some(ms) = args.get("ms").and_then(serde_json::Value::as_u64) {
        return Some(ms);
    }
    if let Some(s) = args.get("seconds").and_then(serde_json::Value::as_f64) {
        return (s.is_finite() && s > 0.0).then_some((s * 1000.0) as u64);
    }
    let text = args.get("interval").and_then(serde_json::Value::as_str)?;
    humantime::parse_duration(text)
        .ok()
        .map(|d| d.as_millis() as u64)
}

impl Board for SimBoard {
    fn updates(&mut self) -> Option<&mut dyn firmware_sim::update::Updates> {
        self.updater
            .as_mut()
            .map(|u| u as &mut dyn firmware_sim::update::Updates)
    }

    fn sample(&mut self, _now_ms: u64, samples: &mut Samples<'_>) {
        self.step_physics();
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let readings = [
            ("temperature", "temperature", round2(self.temperature)),
            ("humidity", "humidity", round2(self.humidity)),
            ("battery", "battery.volts", round2(self.battery)),
            ("counter", "counter", self.counter as f64),
            ("led", "led", flag(self.led)),
            ("relay", "relay", flag(self.relay)),
            ("setpoint", "setpoint", self.setpoint),
        ];
        for (sensor, metric, value) in readings {
            if self.sensors.has(sensor) {
                // Names and values are valid by construction; a refusal is counted by
                // the client.
                let _ = samples.push(metric, value);
            }
        }
    }

    fn apply_setting(&mut self, key: &str, value: &str) -> Result<(), &'static str> {
        let slot = match key {
            "led" => &mut self.led,
            "relay" => &mut self.relay,
            _ => return Err("unknown setting (this board takes interval, led, relay)"),
        };
        *slot = match value {
            "true" | "1" | "\"on\"" => true,
            "false" | "0" | "\"off\"" | "null" => false,
            _ => return Err("use true or false"),
        };
        Ok(())
    }

    fn execute(&mut self, command: &Command, ctx: &mut CommandContext<'_>) -> Outcome {
        if let Some(now) = ctx.server_time() {
            if command.deadline != 0 && now > command.deadline {
                let _ = write!(
                    ctx,
                    "deadline passed {} ms ago; not run",
                    now - command.deadline
                );
                return Outcome::failed(ETIME);
            }
        }
        let args: serde_json::Value = if command.args.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            match serde_json::from_str(&command.args) {
                Ok(v) => v,
                Err(e) => {
                    let _ = write!(ctx, "args are not JSON: {e}");
                    return Outcome::failed(EINVAL);
                }
            }
        };
        let result = match command.name.as_str() {
            "led" | "relay" => self.switch(&command.name, &args),
            "setpoint" => match args
                .get("value")
                .or_else(|| args.get("celsius"))
                .and_then(serde_json::Value::as_f64)
            {
                Some(v) if (5.0..=35.0).contains(&v) => {
                    self.setpoint = v;
                    Ok(format!("setpoint {v} °C"))
                }
                _ => Err(r#"setpoint needs {"value": 5..35} (°C)"#.to_string()),
            },
            "set-interval" => match parse_interval_ms(&args) {
                Some(ms) if (100..=86_400_000).contains(&ms) => {
                    ctx.set_interval_ms(ms as u32);
                    Ok(format!("interval {ms} ms"))
                }
                _ => Err(
                    r#"set-interval needs {"ms": 100..86400000} or {"interval": "5s"}"#.to_string(),
                ),
            },
            "reboot" => {
                ctx.request_reboot();
                Ok("rebooting".to_string())
            }
            other => {
                let _ = write!(ctx, "unknown command `{other}` (supported: {COMMANDS})");
                return Outcome::failed(ENOSYS);
            }
        };
        match result {
            Ok(text) => {
                let _ = ctx.write_str(&text);
                Outcome::OK
            }
            Err(text) => {
                let _ = ctx.write_str(&text);
                Outcome::failed(EINVAL)
            }
        }
    }

    fn wall_clock_ms(&mut self) -> Option<u64> {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64)
    }

    fn on_event(&mut self, event: &Event<'_>) {
        if let Event::Welcome { .. } = event {
            if !self.welcomed_once {
                self.welcomed_once = true;
                self.sink.first_welcome(self.index, &self.id);
            }
        }
        self.sink.event(self.index, &self.id, event);
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoSink;
    impl EventSink for NoSink {
        fn event(&self, _: usize, _: &str, _: &Event<'_>) {}
    }

    fn board() -> SimBoard {
        SimBoard::new(
            0,
            Arc::from("sim-00001"),
            SensorSet::ALL,
            MaskRng::new(1),
            Arc::new(NoSink),
        )
    }

    #[test]
    fn noise_is_symmetric_and_in_range() {
        let mut rng = MaskRng::new(entropy_seed(3));
        let n = 10_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let v = symmetric(&mut rng);
            assert!((-1.0..1.0).contains(&v), "{v}");
            sum += v;
        }
        // The mean of 10,000 uniform values in [-1, 1) has a standard deviation of 0.006.
        let mean = sum / f64::from(n);
        assert!(mean.abs() < 0.04, "mean {mean}");
    }

    #[test]
    fn sensor_sets_parse() {
        assert_eq!(SensorSet::parse(&["all"]), Ok(SensorSet::ALL));
        let s = SensorSet::parse(&["counter", "led"]).expect("valid");
        assert_eq!(s.names(), ["counter", "led"]);
        assert!(SensorSet::parse(&["gps"])
            .expect_err("invalid")
            .contains("valid:"));
    }

    #[test]
    fn interval_args() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
        assert_eq!(parse_interval_ms(&v(r#"{"ms": 500}"#)), Some(500));
        assert_eq!(parse_interval_ms(&v(r#"{"interval": "2s"}"#)), Some(2000));
        assert_eq!(parse_interval_ms(&v(r#"{"seconds": 1.5}"#)), Some(1500));
        assert_eq!(parse_interval_ms(&v(r#"{}"#)), None);
        assert_eq!(parse_on(&v(r#"{"state": "on"}"#)), Some(true));
        assert_eq!(parse_on(&v(r#"{"on": false}"#)), Some(false));
        assert_eq!(parse_on(&v(r#"{"on": "maybe"}"#)), None);
    }

    #[test]
    fn battery_drains_and_counter_counts() {
        let mut b = board();
        let start = b.battery;
        for _ in 0..10 {
            b.step_physics();
        }
        assert!(b.battery < start);
        assert_eq!(b.counter, 10);
        assert!(!b.led());
    }

    #[test]
    fn commands_parse_args() {
        // Exercised end to end through the client in the e2e tests; here only parsing.
        let mut b = board();
        let args = serde_json::json!({"on": true});
        assert_eq!(b.switch("led", &args), Ok("led on".to_string()));
        assert!(b.led());
        assert!(b.switch("relay", &serde_json::json!({})).is_err());
    }
}
