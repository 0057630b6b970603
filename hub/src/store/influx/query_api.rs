//! [`InfluxQuery`], the Flux query client: the request to `POST /api/v2/query`, errors
//! that say what to fix, and the rows of the answer turned into the hub's query rows.

use std::collections::HashMap;
use std::time::Duration;

use super::annotated_csv::{parse_flux_csv, FluxRow};
use super::flux::flux_query;
use super::writer::{error_chain, influx_message};
use super::{check_url, measurement_of, InfluxError};
use crate::config::InfluxConfig;
use crate::store::query::{Aggregate, Query, Row, TelemetryQuery};
use crate::store::StoreError;

/// Largest query answer read, in bytes (100,000 rows of two results fit comfortably).
const QUERY_BODY_LIMIT: u64 = 64 << 20;
/// Queries are analyst-driven and may scan a lot; they get at least this long.
const QUERY_MIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Flux queries against InfluxDB (`POST /api/v2/query`, annotated CSV back). Blocking;
/// the API calls it from `spawn_blocking`. The HTTP client is `ureq` as the hub builds it,
/// without TLS: an `https://` InfluxDB gets a query error saying so (writes go through the
/// `influxdb2` client, which has TLS).
pub struct InfluxQuery {
    agent: ureq::Agent,
    endpoint: String,
    org: String,
    bucket: String,
    token: String,
    measurement: String,
}

impl InfluxQuery {
    /// A query client. Does not contact InfluxDB.
    ///
    /// # Errors
    /// The configuration is unusable.
    pub fn new(cfg: &InfluxConfig) -> Result<InfluxQuery, StoreError> {
        check_url(&cfg.url)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(cfg.timeout.max(QUERY_MIN_TIMEOUT)))
            .build()
            .into();
        Ok(InfluxQuery {
            agent,
            endpoint: format!("{}/api/v2/query", cfg.url.trim_end_matches('/')),
            org: cfg.org.clone(),
            bucket: cfg.bucket.clone(),
            token: cfg.token.clone(),
            measurement: measurement_of(cfg)?,
        })
    }

    fn post(&self, flux: &str) -> Result<String, InfluxError> {
        // JSON rather than `application/vnd.flux`: only a JSON request can ask for the
        // annotation rows (`#datatype`, `#group`, `#default`); raw Flux gets plain CSV.
        let body = serde_json::json!({
            "query": flux,
            "type": "flux",
            "dialect": {
                "header": true,
                "delimiter": ",",
                "annotations": ["datatype", "group", "default"],
                "dateTimeFormat": "RFC3339",
            },
        })
        .to_string();
        let mut request = self
            .agent
            .post(&self.endpoint)
            .query("org", &self.org)
            .header("Content-Type", "application/json")
            .header("Accept", "application/csv");
        if !self.token.is_empty() {
            request = request.header("Authorization", &format!("Token {}", self.token));
        }
        let mut response = request.send(body.as_str()).map_err(|e| {
            InfluxError::Unavailable(format!("querying {}: {}", self.endpoint, error_chain(&e)))
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(QUERY_BODY_LIMIT)
            .read_to_string()
            .map_err(|e| InfluxError::Query(format!("reading the answer: {}", error_chain(&e))))?;
        if status != 200 {
            let hint = match status {
                _ if text.contains("unsupported path requested") => {
                    " (the store has no Flux query API: VictoriaMetrics accepts InfluxDB writes but is queried with PromQL/MetricsQL, e.g. telemetry_value{device=\"...\"}; `hub query` needs InfluxDB 2)"
                }
                401 => " (check storage.influxdb.token)",
                403 => " (the token needs read permission on the bucket)",
                404 => " (check storage.influxdb.org and storage.influxdb.bucket)",
                _ => "",
            };
            return Err(InfluxError::Query(format!(
                "HTTP {status}: {}{hint}",
                influx_message(&text)
            )));
        }
        Ok(text)
    }
}

impl TelemetryQuery for InfluxQuery {
    fn query(&self, q: &Query) -> Result<(Vec<Row>, bool), StoreError> {
        let Some(flux) = flux_query(&self.bucket, &self.measurement, q) else {
            return Ok((Vec::new(), false));
        };
        let text = self.post(&flux)?;
        let rows = parse_flux_csv(&text)?;
        Ok(assemble(q, rows))
    }
}

/// Turns Flux rows into query rows: raw points as they are, windows aligned to `every`
/// (Flux clips the first window's start to the range start) with the count of the
/// `count` result. Sorted by time then metric, cut at the limit.
fn assemble(q: &Query, rows: Vec<FluxRow>) -> (Vec<Row>, bool) {
    let mut out: Vec<Row> = match q.window {
        None => rows
            .into_iter()
            .map(|r| Row {
                metric: r.metric,
                ts: r.time_ms,
                value: r.value,
                count: 1,
            })
            .collect(),
        Some((every, agg)) => {
            let every = every.max(1);
            let mut counts: HashMap<(String, u64), u64> = HashMap::new();
            let mut values = Vec::new();
            for r in rows {
                let ts = r.time_ms - r.time_ms % every;
                match r.result.as_str() {
                    "count" => {
                        let n = r.value.max(0.0) as u64;
                        if agg == Aggregate::Count {
                            values.push(Row {
                                metric: r.metric,
                                ts,
                                value: r.value,
                                count: n,
                            });
                        } else {
                            counts.insert((r.metric, ts), n);
                        }
                    }
                    "agg" if agg != Aggregate::Count => values.push(Row {
                        metric: r.metric,
                        ts,
                        value: r.value,
                        count: 0,
                    }),
                    _ => {}
                }
            }
            if agg != Aggregate::Count {
                for row in &mut values {
                    // Both results come from the same data; a window missing from the
                    // count could only be a write landing between the two reads.
                    row.count = counts
                        .get(&(row.metric.clone(), row.ts))
                        .copied()
                        .unwrap_or(0);
                }
            }
            values
        }
    };
    out.sort_by(|a, b| a.ts.cmp(&b.ts).then_with(|| a.metric.cmp(&b.metric)));
    let truncated = out.len() > q.limit;
    out.truncate(q.limit);
    (out, truncated)
}
