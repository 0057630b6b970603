//! A `#![no_std]` staticlib that instantiates the firmware client with a tiny board, a RAM
//! flash, a dummy transport and timer, and exports C entry points that run it. It exists
//! to be built, not run: building it proves the library needs neither `std` nor `alloc`.
#![no_std]
#![forbid(unsafe_code)]

use core::fmt::Write as _;
use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};

use firmware_sim::driver::{self, Connector, Timer};
use firmware_sim::{
    Board, Client, ClientConfig, CommandContext, Exit, MaskRng, Outcome, RamFlash, RingOutbox,
    Samples,
};
use schemas::Command;

/// Keeps the entry points (and so every generic instantiation of the library they use) in
/// the archive. `#[no_mangle]` would do it too, but counts as unsafe code, which this
/// project forbids; `#[used]` forces the static, and the static references the functions.
#[used]
static ENTRY_POINTS: (extern "C" fn(u32) -> u32, extern "C" fn() -> u32) =
    (firmware_client_steps, firmware_client_run);

/// Stops everything on a panic: no unwinding, no std.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// One sensor and one LED.
struct ProofBoard {
    led: bool,
    ticks: u32,
}

impl Board for ProofBoard {
    fn sample(&mut self, _now_ms: u64, samples: &mut Samples<'_>) {
        self.ticks = self.ticks.wrapping_add(1);
        let _ = samples.push("counter", f64::from(self.ticks));
        let _ = samples.push("led", if self.led { 1.0 } else { 0.0 });
    }

    fn execute(&mut self, command: &Command, ctx: &mut CommandContext<'_>) -> Outcome {
        if command.name == "led" {
            self.led = command.args.contains("true");
            let _ = write!(ctx, "led {}", self.led);
            Outcome::OK
        } else {
            Outcome::failed(2)
        }
    }

    fn wall_clock_ms(&mut self) -> Option<u64> {
        Some(1_764_000_000_000)
    }
}

/// A transport that fails every operation (a board would wrap its TCP/TLS socket).
struct NoTransport;

#[derive(Debug)]
struct NoError;

impl embedded_io_async::Error for NoError {
    fn kind(&self) -> embedded_io_async::ErrorKind {
        embedded_io_async::ErrorKind::NotConnected
    }
}

impl embedded_io_async::ErrorType for NoTransport {
    type Error = NoError;
}

impl embedded_io_async::Read for NoTransport {
    async fn read(&mut self, _buf: &mut [u8]) -> Result<usize, NoError> {
        Err(NoError)
    }
}

impl embedded_io_async::Write for NoTransport {
    async fn write(&mut self, _buf: &[u8]) -> Result<usize, NoError> {
        Err(NoError)
    }
}

struct NoNetwork;

impl Connector for NoNetwork {
    type Transport = NoTransport;
    type Error = NoError;

    async fn connect(&mut self) -> Result<NoTransport, NoError> {
        Ok(NoTransport)
    }

    fn host(&self) -> &str {
        "hub.example.net:8443"
    }

    async fn disconnect(&mut self, _transport: NoTransport) {}
}

/// A clock that jumps a second per reading and never waits.
struct StepTimer(core::cell::Cell<u64>);

impl Timer for StepTimer {
    fn now_ms(&self) -> u64 {
        let t = self.0.get() + 1000;
        self.0.set(t);
        t
    }

    async fn wait_until(&self, _at_ms: u64) {}
}

/// Runs the sans-io client for a few steps with static-sized buffers on the stack.
/// Returns the number of batches recorded.
pub extern "C" fn firmware_client_steps(steps: u32) -> u32 {
    let mut flash = [0u8; 4096];
    let mut rx = [0u8; 1024];
    let mut tx = [0u8; 1536];
    let Ok((ring, _)) = RingOutbox::mount(RamFlash::new(&mut flash[..])) else {
        return 0;
    };
    let board = ProofBoard {
        led: false,
        ticks: 0,
    };
    let config = ClientConfig::new("token", "proof-1");
    let Ok(mut client) = Client::new(config, ring, board, MaskRng::new(1), &mut rx, &mut tx) else {
        return 0;
    };
    for step in 0..steps {
        match client.poll(u64::from(step) * 1000) {
            Ok(firmware_sim::Io::Connect) => client.handle_connect_failed(u64::from(step) * 1000),
            Ok(_) => {}
            Err(_) => return 0,
        }
    }
    client.stats().batches_recorded as u32
}

/// Drives the async driver to completion with a no-op waker (every future here is ready
/// at once: the transport fails and the timer never waits), stopping after the first
/// connection attempt.
pub extern "C" fn firmware_client_run() -> u32 {
    let mut flash = [0u8; 4096];
    let mut rx = [0u8; 1024];
    let mut tx = [0u8; 1536];
    let Ok(ring) = RingOutbox::format(RamFlash::new(&mut flash[..]), 1) else {
        return 0;
    };
    let board = ProofBoard {
        led: false,
        ticks: 0,
    };
    let Ok(mut client) = Client::new(
        ClientConfig::new("token", "proof-1"),
        ring,
        board,
        MaskRng::new(2),
        &mut rx,
        &mut tx,
    ) else {
        return 0;
    };
    let timer = StepTimer(core::cell::Cell::new(0));
    let mut network = NoNetwork;
    let fut = driver::run(
        &mut client,
        &mut network,
        &timer,
        core::future::ready(()),
        0,
    );
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(result) = fut.as_mut().poll(&mut cx) {
            return match result {
                Ok(Exit::Stopped) => 1,
                Ok(Exit::Reboot) => 2,
                Err(_) => 3,
            };
        }
    }
    0
}
