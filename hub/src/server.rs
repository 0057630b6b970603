//! Assembles a running hub from a configuration: data directory, stores, ingest writer,
//! device listener, and the background tasks. Tests start it on port 0 through the same
//! function the binary uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::auth::{Auth, REVOCATION_REFRESH};
use crate::client_cert::{CertError, DeviceCa};
use crate::cluster::ledger::RedisLedger;
use crate::cluster::registry::RedisRegistry;
use crate::cluster::seq::RedisSeq;
use crate::cluster::updates::RedisUpdates;
use crate::cluster::Backplane;
use crate::config::{HubConfig, StorageBackend};
use crate::datadir::{self, DataDir, DataDirError};
use crate::device::{listener, DeviceContext};
use crate::events::EventBus;
use crate::ingest::Ingest;
use crate::jobs::Jobs;
use crate::ledger::Ledger;
use crate::presence::Presence;
use crate::store::influx::{InfluxQuery, InfluxTelemetry};
use crate::store::jobs::JobStore;
use crate::store::ledger::LedgerStore;
use crate::store::meta::MetaStore;
use crate::store::query::{SqliteQuery, TelemetryQuery};
use crate::store::sqlite::{SqliteSeq, WalCheckpointer};
use crate::store::sqlite_telemetry::{SqliteTelemetry, TelemetryPruner};
use crate::store::telemetry_db;
use crate::store::updates::{SqliteUpdates, UpdateStore};
use crate::store::{now_ms, StoreError};
use crate::store::{CommandStore, DeviceRegistry, SeqStore, TelemetryStore};
use crate::tls::{self, TlsError};
use crate::token::TokenSecret;

/// How often the device table learns the last_seen and RTT of online devices.
const SEEN_FLUSH: Duration = Duration::from_secs(5);

/// How often old history is pruned, and how often a round of telemetry pruning starts.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How often the WAL is copied into the database file (see [`checkpoint_wal`]).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Most readings one telemetry pruning step deletes (one short write transaction).
const PRUNE_STEP_ROWS: usize = 2_000;

/// The least pause between two telemetry pruning steps. A step waits at least as long as
/// the one before took, so pruning holds the write lock at most half the time and the
/// ingest writer's commits get in between.
const PRUNE_STEP_PAUSE: Duration = Duration::from_millis(20);

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be prepared.
    #[error("data directory")]
    DataDir(#[from] DataDirError),
    /// The store could not be opened.
    #[error("store")]
    Store(#[from] StoreError),
    /// TLS material is unusable.
    #[error("tls")]
    Tls(#[from] TlsError),
    /// The device CA (client certificates) is unusable.
    #[error("device CA")]
    DeviceCa(#[from] CertError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The Redis backplane is unreachable.
    #[error("cluster backplane: {0}")]
    Backplane(StoreError),
    /// The ingest writer thread could not start.
    #[error("cannot start the ingest writer: {0}")]
    Writer(std::io::Error),
}

/// Why a running hub stopped on its own: the part it cannot run without that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubFailure {
    /// The ingest writer thread ended while the hub ran (a bug; the log says more). The
    /// hub stops so that the service manager restarts a whole hub.
    #[error("the ingest writer died (see the log above)")]
    IngestWriterDied,
}

/// What a started hub tells its caller.
#[derive(Debug, Clone)]
pub struct HubInfo {
    /// Where devices connect.
    pub device_addr: SocketAddr,
    /// The device URL (wss:// or ws://).
    pub device_url: String,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// The admin API base URL (http://...).
    pub admin_url: String,
    /// The CA certificate devices should trust (when TLS material was generated).
    pub ca_file: Option<PathBuf>,
    /// Files created by this start (first start only).
    pub created: Vec<PathBuf>,
}

/// A running hub.
pub struct RunningHub {
    /// Addresses and files.
    pub info: HubInfo,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    failure: Arc<std::sync::Mutex<Option<HubFailure>>>,
    /// The data directory's lock, held while the hub runs.
    _lock: std::fs::File,
}

impl RunningHub {
    /// Starts graceful shutdown: stop accepting, close devices with 1001, flush the writer.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the hub has stopped: after [`RunningHub::shutdown`], or on its own when
    /// a part it cannot run without failed.
    ///
    /// # Errors
    /// [`HubFailure`]: what failed, when the hub stopped on its own.
    pub async fn wait(self) -> Result<(), HubFailure> {
        let _ = self.task.await;
        match self.failure.lock().map(|mut f| f.take()) {
            Ok(Some(failure)) => Err(failure),
            _ => Ok(()),
        }
    }

    /// Completes when the hub has begun shutting down, for whatever reason.
    ///
    /// Cancel safety: safe; it only observes.
    pub async fn stopping(&self) {
        let mut flag = self.shutdown.subscribe();
        crate::stopping(&mut flag).await;
    }
}

/// The host part of a URL for a bound address: `unspecified` for a wildcard bind (a
/// client cannot connect to 0.0.0.0), IPv6 in brackets.
fn url_host(addr: SocketAddr, unspecified: &str) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => unspecified.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// Starts a hub.
///
/// # Errors
/// See [`StartError`]; nothing keeps running when this fails.
///
/// Cancel safety: not cancel safe: if dropped midway, listeners and the writer thread that were already started keep running until the process exits.
pub async fn start(config: HubConfig) -> Result<RunningHub, StartError> {
    // The recorder first: stores set gauges while they open.
    let metrics = api::metrics_handle();
    let data = DataDir::new(&config.data_dir);
    let secrets = datadir::Secrets {
        token_secret: config.token_secret.is_none(),
        admin_token: config.admin_token.is_none(),
        ticket_key: config.tls.session_tickets && config.tls.ticket_key.is_none(),
    };
    // Before anything in the directory is touched.
    let lock = data.lock()?;
    let created = data.init(&config.tls.server_names, secrets)?.files;
    for (configured, path, key) in [
        (
            config.token_secret.is_some(),
            data.token_secret(),
            "auth.token_secret",
        ),
        (
            config.admin_token.is_some(),
            data.admin_token(),
            "auth.admin_token",
        ),
    ] {
        if configured && path.exists() {
            tracing::warn!(file = %path.display(), "{key} comes from the configuration; the file is not used (remove it to avoid confusion)");
        }
    }
    let secret = match config
        .token_secret
        .as_deref()
        .and_then(TokenSecret::from_hex)
    {
        Some(secret) => secret,
        None => data.read_token_secret()?,
    };
    let db = data.database();
    let telemetry_db = data.telemetry_database();

    let cluster = match &config.cluster {
        Some(cluster) => {
            let backplane = Backplane::connect(cluster)
                .await
                .map_err(StartError::Backplane)?;
            tracing::info!(node = backplane.node(), redis = %cluster.redis_url, "joined the cluster backplane");
            Some(backplane)
        }
        None => None,
    };
    let clustered = cluster.is_some();
    if !clustered {
        telemetry_db::separate_telemetry(&db, &telemetry_db, config.sqlite)
            .map_err(StoreError::from)?;
    }
    let meta: Arc<dyn DeviceRegistry> = match &cluster {
        Some(bp) => Arc::new(RedisRegistry::new(bp.sync(), bp.node())),
        None => Arc::new(MetaStore::open(&db, config.sqlite)?),
    };
    let stale = meta.mark_all_offline(now_ms(), "hub_restart")?;
    if stale > 0 {
        tracing::info!(
            devices = stale,
            "marked devices of the previous run offline"
        );
    }
    let auth = Arc::new(Auth::new(secret));
    auth.set_revocations(&meta.revocations()?);

    // Jobs live with the commands they create: one SQLite database, or the backplane.
    let (ledger_store, job_store): (Arc<dyn CommandStore>, Arc<dyn JobStore>) = match &cluster {
        Some(bp) => {
            let store = Arc::new(RedisLedger::new(bp.sync()));
            (store.clone(), store)
        }
        None => {
            let store = Arc::new(LedgerStore::open(&db, config.sqlite)?);
            (store.clone(), store)
        }
    };
    let (telemetry, query): (Box<dyn TelemetryStore>, Arc<dyn TelemetryQuery>) =
        match &config.storage {
            StorageBackend::Sqlite => (
                Box::new(SqliteTelemetry::open(&telemetry_db, config.sqlite)?),
                Arc::new(SqliteQuery::open(&telemetry_db)?),
            ),
            StorageBackend::InfluxDb(influx) => {
                let marks: Box<dyn SeqStore> = match &cluster {
                    Some(bp) => Box::new(RedisSeq::new(bp.sync())),
                    None => Box::new(SqliteSeq::open(&telemetry_db, config.sqlite)?),
                };
                (
                    Box::new(InfluxTelemetry::open(
                        influx,
                        &data.root().join("spool"),
                        marks,
                    )?),
                    Arc::new(InfluxQuery::new(influx)?),
                )
            }
        };
    let (ingest, writer) = Ingest::start(telemetry, config.ingest_queue, config.ingest_max_group)
        .map_err(StartError::Writer)?;

    // Client certificates need TLS at the hub: behind a TLS-terminating proxy (plain ws)
    // no certificate reaches it, and none is issued.
    let device_ca = match (config.device.plain_ws, &config.tls.device_ca) {
        (true, _) => None,
        (false, Some(cert)) => Some(DeviceCa::load(cert, config.tls.device_ca_key.as_deref())?),
        (false, None) => Some(DeviceCa::load(&data.ca_cert(), Some(&data.ca_key()))?),
    }
    .map(Arc::new);
    if cluster.is_some() && device_ca.is_some() && config.tls.device_ca.is_none() {
        tracing::info!("client certificates this node issues are accepted by this node only: set tls.device_ca (and tls.device_ca_key) to the same CA on every node to accept them on all");
    }
    let clients = device_ca.as_deref().map(DeviceCa::verifier).transpose()?;
    let tickets = match (config.device.plain_ws, config.tls.session_tickets) {
        (false, true) => {
            let path = config
                .tls
                .ticket_key
                .clone()
                .unwrap_or_else(|| data.ticket_key());
            Some(Arc::new(tls::tickets::Tickets::from_file(&path)?))
        }
        _ => None,
    };
    let (tls, ca_file) = if config.device.plain_ws {
        (None, None)
    } else {
        match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => (Some(tls::acceptor(cert, key, clients, tickets)?), None),
            _ => (
                Some(tls::acceptor(
                    &data.server_cert(),
                    &data.server_key(),
                    clients,
                    tickets,
                )?),
                Some(data.ca_cert()),
            ),
        }
    };
    let listener =
        crate::device::listener::bind(config.device.listen).map_err(|source| StartError::Bind {
            addr: config.device.listen,
            source,
        })?;
    let device_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.device.listen,
        source,
    })?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let host = url_host(device_addr, "localhost");
    let device_url = format!(
        "{scheme}://{host}:{}{}",
        device_addr.port(),
        schemas::DEVICE_PATH
    );

    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let admin_host = url_host(admin_addr, "127.0.0.1");
    let admin_url = format!("http://{admin_host}:{}", admin_addr.port());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let presence = Arc::new(Presence::default());
    let (forward_tx, forward_rx) = tokio::sync::mpsc::channel(crate::events::EVENT_BUFFER);
    let events = if cluster.is_some() {
        EventBus::forwarding(forward_tx)
    } else {
        EventBus::new()
    };
    let ledger = Ledger::new(
        ledger_store,
        events.clone(),
        presence.clone(),
        cluster.clone(),
    );
    // Who runs jobs and advances rollouts here, in their leases.
    let holder = cluster
        .as_ref()
        .map_or_else(|| "hub".to_string(), |bp| bp.node().to_string());
    let jobs = Jobs::new(
        job_store,
        meta.clone(),
        ledger.clone(),
        events.clone(),
        holder.clone(),
    );
    let firmware = Arc::new(crate::firmware::FirmwareStore::new(
        config
            .firmware
            .dir
            .clone()
            .unwrap_or_else(|| data.root().join("firmware")),
        config
            .firmware
            .signing_key
            .clone()
            .unwrap_or_else(|| data.root().join("firmware-signing-key")),
    ));
    // Updates and rollouts live where the commands do: the hub database, or the backplane
    // (the images themselves are in `firmware.dir`, which every node of a cluster shares).
    let update_store: Arc<dyn UpdateStore> = match &cluster {
        Some(bp) => Arc::new(RedisUpdates::new(bp.sync())),
        None => Arc::new(SqliteUpdates::open(&db, config.sqlite)?),
    };
    let updates = Arc::new(
        crate::updates::Updates::new(
            update_store,
            firmware,
            events.clone(),
            presence.clone(),
            cluster.clone(),
            holder.clone(),
        )
        .with_transfer_cap(config.firmware.max_transfer_rate),
    );
    let ctx = Arc::new(DeviceContext {
        config: config.device.clone(),
        auth: auth.clone(),
        ingest: ingest.clone(),
        ledger: ledger.clone(),
        meta: meta.clone(),
        presence: presence.clone(),
        events: events.clone(),
        cluster: cluster.clone(),
        shutdown: shutdown_rx.clone(),
        updates,
    });
    let backplane = cluster.as_ref().map(|bp| {
        bp.start(
            presence.clone(),
            events.clone(),
            meta.clone(),
            forward_rx,
            shutdown_rx.clone(),
        )
    });
    let admin_token: Arc<str> = match &config.admin_token {
        Some(token) => Arc::from(token.as_str()),
        None => Arc::from(data.read_admin_token()?),
    };
    let app = api::router(ApiState {
        ctx: ctx.clone(),
        jobs: jobs.clone(),
        shutdown: shutdown_rx.clone(),
        query,
        admin_token,
        metrics,
        device_ca,
        console: Arc::new(api::console::ConsoleSessions::new(
            admin_url.starts_with("https:"),
        )),
    });
    let api = AdminApi::start(admin_listener, app, shutdown_rx.clone()).map_err(|source| {
        StartError::Bind {
            addr: config.admin_listen,
            source,
        }
    })?;
    datadir::write_text(&data.admin_url(), &admin_url)?;
    // Written last: tools and tests take its presence to mean the hub is up.
    datadir::write_text(&data.device_url(), &device_url)?;

    // The writer is the one part the hub cannot limp along without: if its thread dies
    // (a bug), stop, so that the service manager restarts a whole hub. Devices keep their
    // unacknowledged data and re-send it.
    let failure = Arc::new(std::sync::Mutex::new(None));
    let watchdog = {
        let (ctx, failure, shutdown_tx, mut stop) = (
            ctx.clone(),
            failure.clone(),
            shutdown_tx.clone(),
            shutdown_rx.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = crate::stopping(&mut stop) => {}
                _ = ctx.ingest.writer_exited() => {
                    tracing::error!("the ingest writer died; shutting down so that the hub is restarted");
                    if let Ok(mut f) = failure.lock() {
                        *f = Some(HubFailure::IngestWriterDied);
                    }
                    let _ = shutdown_tx.send(true);
                }
            }
        })
    };
    let supervisor = tokio::spawn(jobs.clone().supervise(shutdown_rx.clone()));
    let rollouts = tokio::spawn(ctx.updates.clone().supervise(shutdown_rx.clone()));
    let background = tokio::spawn(background(
        ctx.clone(),
        jobs,
        config.history_retention,
        shutdown_rx.clone(),
    ));
    let sweeper = tokio::spawn(ledger.sweep(shutdown_rx.clone()));
    let pruner = match (&config.storage, config.telemetry_retention.is_zero()) {
        (StorageBackend::Sqlite, false) => Some(tokio::spawn(prune_telemetry(
            TelemetryPruner::open(&telemetry_db, config.sqlite)?,
            config.telemetry_retention,
            shutdown_rx.clone(),
        ))),
        _ => None,
    };
    // A clustered hub keeps its state in Redis and its telemetry in InfluxDB: no files.
    let mut checkpointers = Vec::new();
    if !clustered {
        for (file, path) in [("hub.db", &db), ("telemetry.db", &telemetry_db)] {
            checkpointers.push(tokio::spawn(checkpoint_wal(
                file,
                WalCheckpointer::open(path, config.sqlite)?,
                shutdown_rx.clone(),
            )));
        }
    }
    let task = tokio::spawn(async move {
        listener::run(listener, tls, ctx).await;
        let _ = background.await;
        for checkpointer in checkpointers {
            let _ = checkpointer.await;
        }
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        let _ = watchdog.await;
        let _ = sweeper.await;
        let _ = supervisor.await;
        let _ = rollouts.await;
        if let Some(backplane) = backplane {
            let _ = backplane.await;
        }
        // Event streams end at shutdown; anything still open after a second is cut.
        api.stop(Duration::from_secs(1)).await;
        // The writer commits what is queued and stops, even if something still holds a
        // sender.
        ingest.shutdown().await;
        // Every sender of the ingest queue is gone now: the writer drains and exits.
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(())) => tracing::info!("ingest writer flushed"),
            _ => tracing::error!("ingest writer ended abnormally"),
        }
    });
    Ok(RunningHub {
        info: HubInfo {
            device_addr,
            device_url,
            admin_addr,
            admin_url,
            ca_file,
            created,
        },
        shutdown: shutdown_tx,
        task,
        failure,
        _lock: lock,
    })
}

/// Deletes presence history, finished commands and ended jobs older than the retention,
/// so that a flapping device or a busy command stream cannot grow the database forever.
async fn prune_history(ctx: &Arc<DeviceContext>, jobs: &Jobs, retention: Duration) {
    let before = now_ms().saturating_sub(retention.as_millis() as u64);
    let meta = ctx.meta.clone();
    let presence = tokio::task::spawn_blocking(move || meta.prune_history(before)).await;
    let commands = ctx.ledger.prune(before).await;
    let ended = jobs.prune(before).await;
    match (presence, commands, ended) {
        (Ok(Ok(p)), Ok(c), Ok(j)) if p + c + j > 0 => {
            tracing::info!(
                presence_rows = p,
                commands = c,
                jobs = j,
                "pruned history older than the retention"
            )
        }
        (Ok(Ok(_)), Ok(_), Ok(_)) => {}
        (p, c, j) => {
            tracing::warn!(presence = ?p.map(|r| r.map_err(|e| e.to_string())), commands = ?c.map_err(|e| e.to_string()), jobs = ?j.map_err(|e| e.to_string()), "pruning history failed")
        }
    }
}

/// Copies the WAL of one of the hub's database files (`file` names it in metrics and
/// logs) into the file every [`CHECKPOINT_EVERY`], so that commits never do (see
/// `store::sqlite::configured`), until shutdown.
///
/// Cancel safety: safe; a checkpoint already running when the future is dropped
/// completes on its blocking thread.
async fn checkpoint_wal(
    file: &'static str,
    checkpointer: WalCheckpointer,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(CHECKPOINT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpointer = Some(checkpointer);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = crate::stopping(&mut shutdown) => return,
            _ = ticks.tick() => {}
        }
        let Some(mut owned) = checkpointer.take() else {
            return;
        };
        let Ok((owned, done)) = tokio::task::spawn_blocking(move || {
            let done = owned.checkpoint();
            (owned, done)
        })
        .await
        else {
            tracing::error!(
                file,
                "the WAL checkpointer panicked; the database's WAL file will grow"
            );
            return;
        };
        checkpointer = Some(owned);
        match done {
            Ok(done) => {
                failing = false;
                metrics::gauge!("hub_sqlite_wal_frames", "file" => file)
                    .set((done.wal_frames - done.copied) as f64);
                if done.restarted {
                    metrics::counter!("hub_sqlite_wal_restarts_total", "file" => file).increment(1);
                }
            }
            // Said once per run of failures: it is retried every tick.
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(file, error = %err, "checkpointing the database's WAL failed; retrying");
            }
            Err(_) => {}
        }
    }
}

/// Deletes readings older than `retention` from the SQLite store: a round every
/// [`PRUNE_EVERY`] (the first at start), each in steps of at most [`PRUNE_STEP_ROWS`]
/// readings with a pause between them, so that a large backlog never holds up ingest
/// for longer than one step.
///
/// Cancel safety: safe; a step already running when the future is dropped completes (or
/// rolls back) on its blocking thread.
async fn prune_telemetry(
    pruner: TelemetryPruner,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rounds = tokio::time::interval(PRUNE_EVERY);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruner = Some(pruner);
    loop {
        tokio::select! {
            _ = crate::stopping(&mut shutdown) => return,
            _ = rounds.tick() => {}
        }
        let before = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut deleted = 0usize;
        loop {
            let Some(mut owned) = pruner.take() else {
                return;
            };
            let started = tokio::time::Instant::now();
            let Ok((owned, step)) = tokio::task::spawn_blocking(move || {
                let step = owned.step(before, PRUNE_STEP_ROWS);
                (owned, step)
            })
            .await
            else {
                tracing::error!("the telemetry pruner panicked; readings are no longer pruned");
                return;
            };
            pruner = Some(owned);
            match step {
                Ok(step) => {
                    deleted += step.deleted;
                    if step.round_done {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "pruning old readings failed; retrying in the next round");
                    break;
                }
            }
            let pause = started.elapsed().max(PRUNE_STEP_PAUSE);
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if deleted > 0 {
            tracing::info!(
                readings = deleted,
                retention = %humantime::format_duration(retention),
                "deleted readings older than the retention"
            );
        }
    }
}

/// Periodic work: reload revocations, record last_seen and RTT of online devices, prune
/// old history.
async fn background(
    ctx: Arc<DeviceContext>,
    jobs: Jobs,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut revocations = tokio::time::interval(REVOCATION_REFRESH);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = tokio::time::interval(SEEN_FLUSH);
    revocations.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    seen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = crate::stopping(&mut shutdown) => return,
            _ = revocations.tick() => ctx.auth.refresh(&ctx.meta, &ctx.presence).await,
            _ = prune.tick(), if !retention.is_zero() => prune_history(&ctx, &jobs, retention).await,
            _ = seen.tick() => {
                let rows: Vec<(String, u64, Option<u64>)> = ctx
                    .presence
                    .snapshot()
                    .into_iter()
                    .map(|(d, c)| (d.to_string(), c.stats.last_seen_ms.load(std::sync::atomic::Ordering::Relaxed), c.stats.rtt()))
                    .collect();
                if !rows.is_empty() {
                    let meta = ctx.meta.clone();
                    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || meta.devices_seen(&rows)).await {
                        tracing::warn!(error = %err, "cannot record device liveness");
                    }
                }
            }
        }
    }
}

/// The admin API, served on a runtime of its own: one thread, apart from the workers that
/// run the device connections. Under load those have thousands of connection tasks ready
/// at once (every group commit releases the acks of a few hundred), and an API request
/// queued behind them waited several milliseconds for each of its turns; a command's round
/// trip (`hub send`) takes several. The API's thread is idle most of the time, so the
/// kernel runs it as soon as it is woken. Store calls still run on blocking threads (of
/// this runtime), and everything the API shares with the hub (presence, the ledger, the
/// event bus) works from either runtime.
struct AdminApi {
    /// Stops the server at once, dropping what is still open.
    abort: Option<tokio::sync::oneshot::Sender<()>>,
    /// Resolves when the API's thread has finished.
    done: tokio::sync::oneshot::Receiver<()>,
}

/// Blocking threads of the admin API's runtime: store calls of concurrent API requests.
const ADMIN_BLOCKING_THREADS: usize = 16;

impl AdminApi {
    /// Serves `app` on `listener` on a thread of its own until `shutdown`.
    ///
    /// # Errors
    /// The listener cannot be moved to the new runtime, or the thread cannot start.
    fn start(
        listener: TcpListener,
        app: axum::Router,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<AdminApi> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("admin-api")
            .max_blocking_threads(ADMIN_BLOCKING_THREADS)
            .build()?;
        // Registered again with the API's runtime (a tokio socket belongs to the runtime
        // it was made on), here, so that a failure stops the hub's start.
        let listener = {
            let _api = runtime.enter();
            TcpListener::from_std(listener.into_std()?)?
        };
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("admin-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                        crate::stopping(&mut shutdown).await
                    });
                    tokio::select! {
                        served = serve => if let Err(err) = served {
                            tracing::error!(error = %err, "admin API stopped");
                        },
                        _ = abort_rx => {}
                    }
                });
                // Dropping the runtime cancels whatever is still open (a long poll, an
                // event stream).
                drop(runtime);
                let _ = done_tx.send(());
            })?;
        Ok(AdminApi {
            abort: Some(abort_tx),
            done,
        })
    }

    /// Waits up to `grace` for the API to finish after shutdown was raised, then cuts
    /// what is still open and waits for its thread to end.
    ///
    /// Cancel safety: safe; the API stops either way once shutdown was raised.
    async fn stop(mut self, grace: Duration) {
        if tokio::time::timeout(grace, &mut self.done).await.is_ok() {
            return;
        }
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
        let _ = self.done.await;
    }
}
