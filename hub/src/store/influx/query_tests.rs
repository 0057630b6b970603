//! Tests of the Flux query path against recorded InfluxDB 2 answers
//! (`hub/tests/fixtures/influx/`) served by the fake InfluxDB: the Flux sent, the rows
//! parsed and assembled, the errors reported.

use super::annotated_csv::time_ms;
use super::fake_influx::{cfg, closed_url, FakeInflux, Request};
use super::flux::flux_query;
use super::{InfluxQuery, MAX_TIME_MS};
use crate::store::query::{Aggregate, Query, Row, TelemetryQuery};
use crate::store::StoreError;

fn fixture(name: &str) -> String {
    let text = match name {
        "raw" => include_str!("../../../tests/fixtures/influx/raw.csv"),
        "window_mean" => include_str!("../../../tests/fixtures/influx/window_mean.csv"),
        "window_count" => include_str!("../../../tests/fixtures/influx/window_count.csv"),
        "error" => include_str!("../../../tests/fixtures/influx/error.csv"),
        other => panic!("no fixture {other}"),
    };
    assert!(
        text.contains("\r\n"),
        "fixture {name} lost InfluxDB's CRLF line ends"
    );
    text.to_string()
}

fn ms(rfc3339: &str) -> u64 {
    time_ms(rfc3339).expect("time")
}

fn row(metric: &str, ts: &str, value: f64, count: u64) -> Row {
    Row {
        metric: metric.into(),
        ts: ms(ts),
        value,
        count,
    }
}

type QueryResult = Result<(Vec<Row>, bool), StoreError>;

/// Runs a query against a server answering `answer`; returns the result and the request.
fn run(q: &Query, status: u16, answer: String) -> (QueryResult, Option<Request>) {
    let server = FakeInflux::start(move |_, _| (status, answer.clone()));
    let result = InfluxQuery::new(&cfg(&server.url()))
        .expect("client")
        .query(q);
    (result, server.requests().into_iter().next().map(|(r, _)| r))
}

fn sent_flux(req: &Request) -> String {
    let body: serde_json::Value = serde_json::from_slice(&req.body).expect("json body");
    assert_eq!(body["type"], "flux");
    assert_eq!(
        body["dialect"]["annotations"],
        serde_json::json!(["datatype", "group", "default"])
    );
    assert_eq!(body["dialect"]["header"], true);
    body["query"].as_str().expect("query").to_string()
}

#[test]
fn raw_points_come_from_flux_sorted_and_limited() {
    let q = Query {
        device: "sensor-7".into(),
        metric: None,
        from: ms("2026-11-25T08:00:00Z"),
        until: ms("2026-11-25T09:00:00Z"),
        window: None,
        limit: 3,
    };
    let (result, req) = run(&q, 200, fixture("raw"));
    let (rows, truncated) = result.expect("query");
    assert!(truncated);
    assert_eq!(
        rows,
        [
            row("humidity", "2026-11-25T08:00:00Z", 48.0, 1),
            row("temp", "2026-11-25T08:00:00Z", 21.5, 1),
            row("humidity", "2026-11-25T08:00:00.250Z", 47.5, 1),
        ]
    );
    let req = req.expect("request");
    assert_eq!(req.method, "POST");
    assert_eq!(req.target, "/api/v2/query?org=acme");
    assert_eq!(req.header("authorization"), Some("Token s3cret"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("accept"), Some("application/csv"));
    assert_eq!(
        sent_flux(&req),
        r#"from(bucket: "fleet")
  |> range(start: 2026-11-25T08:00:00.000Z, stop: 2026-11-25T09:00:00.000Z)
  |> filter(fn: (r) => r._measurement == "telemetry" and r._field == "value" and r.device == "sensor-7")
  |> keep(columns: ["_time", "_value", "metric"])
  |> group()
  |> sort(columns: ["_time", "metric"])
  |> limit(n: 4)
"#
    );
}

#[test]
fn windows_merge_the_aggregate_with_its_count_and_align_to_the_epoch() {
    let q = Query {
        device: "sensor-7".into(),
        metric: Some("temp".into()),
        from: ms("2026-11-25T08:00:07.500Z"),
        until: ms("2026-11-25T08:03:00Z"),
        window: Some((60_000, Aggregate::Mean)),
        limit: 10,
    };
    let (result, req) = run(&q, 200, fixture("window_mean"));
    let (rows, truncated) = result.expect("query");
    assert!(!truncated);
    assert_eq!(
        rows,
        [
            // Flux reports the first window at the range start; it starts at 08:00.
            row("temp", "2026-11-25T08:00:00Z", 20.5, 2),
            row("temp", "2026-11-25T08:01:00Z", 21.125, 8),
            row("temp", "2026-11-25T08:02:00Z", 19.0, 1),
        ]
    );
    assert_eq!(
        sent_flux(&req.expect("request")),
        r#"data = from(bucket: "fleet")
  |> range(start: 2026-11-25T08:00:07.500Z, stop: 2026-11-25T08:03:00.000Z)
  |> filter(fn: (r) => r._measurement == "telemetry" and r._field == "value" and r.device == "sensor-7" and r.metric == "temp")

data
  |> aggregateWindow(every: 60000ms, fn: mean, createEmpty: false, timeSrc: "_start")
  |> keep(columns: ["_time", "_value", "metric"])
  |> group()
  |> sort(columns: ["_time", "metric"])
  |> limit(n: 11)
  |> yield(name: "agg")

data
  |> aggregateWindow(every: 60000ms, fn: count, createEmpty: false, timeSrc: "_start")
  |> keep(columns: ["_time", "_value", "metric"])
  |> group()
  |> sort(columns: ["_time", "metric"])
  |> limit(n: 11)
  |> yield(name: "count")
"#
    );
}

#[test]
fn a_count_query_uses_the_count_alone() {
    let q = Query {
        device: "sensor-7".into(),
        metric: None,
        from: ms("2026-11-25T00:00:00Z"),
        until: ms("2026-11-25T02:00:00Z"),
        window: Some((3_600_000, Aggregate::Count)),
        limit: 2,
    };
    let (result, req) = run(&q, 200, fixture("window_count"));
    let (rows, truncated) = result.expect("query");
    assert!(truncated);
    assert_eq!(
        rows,
        [
            row("humidity", "2026-11-25T00:00:00Z", 120.0, 120),
            row("temp", "2026-11-25T00:00:00Z", 118.0, 118),
        ]
    );
    let flux = sent_flux(&req.expect("request"));
    assert!(
        flux.contains(
            "aggregateWindow(every: 3600000ms, fn: count, createEmpty: false, timeSrc: \"_start\")"
        ),
        "{flux}"
    );
    assert!(
        flux.contains("|> limit(n: 3)\n  |> yield(name: \"count\")"),
        "{flux}"
    );
    assert!(!flux.contains("\"agg\""), "{flux}");
    // Each aggregate maps to its Flux function.
    for (agg, f) in [
        (Aggregate::Min, "min"),
        (Aggregate::Max, "max"),
        (Aggregate::Sum, "sum"),
        (Aggregate::Last, "last"),
    ] {
        let q = Query {
            window: Some((1000, agg)),
            ..q.clone()
        };
        let flux = flux_query("fleet", "telemetry", &q).expect("flux");
        assert!(
            flux.contains(&format!("every: 1000ms, fn: {f}, createEmpty: false")),
            "{flux}"
        );
    }
}

#[test]
fn query_errors_are_reported_with_influxdb_s_message() {
    let q = Query {
        device: "sensor-7".into(),
        metric: None,
        from: 0,
        until: 1000,
        window: Some((100, Aggregate::Mean)),
        limit: 10,
    };
    let err = run(&q, 200, fixture("error"))
        .0
        .expect_err("error table")
        .to_string();
    assert!(
        err.contains(r#"aggregateWindow: missing time column "_start""#) && err.contains("897"),
        "{err}"
    );
    let (result, _) = run(
        &q,
        401,
        r#"{"code":"unauthorized","message":"unauthorized access"}"#.into(),
    );
    let err = result.expect_err("401").to_string();
    assert!(
        err.contains("HTTP 401")
            && err.contains("unauthorized access")
            && err.contains("storage.influxdb.token"),
        "{err}"
    );
    let (result, _) = run(&q, 404, r#"{"code":"not found","message":"failed to initialize execute state: could not find bucket \"fleet\""}"#.into());
    let err = result.expect_err("404").to_string();
    assert!(
        err.contains("could not find bucket") && err.contains("storage.influxdb.bucket"),
        "{err}"
    );
    // https is spoken (ureq with rustls); a server that does not answer TLS is
    // reported as unavailable, naming the endpoint.
    let server = FakeInflux::start(|_, _| (200, String::new()));
    let https = server.url().replace("http://", "https://");
    let err = InfluxQuery::new(&cfg(&https))
        .expect("client")
        .query(&q)
        .expect_err("https to a plain http server")
        .to_string();
    assert!(
        err.contains("unavailable") && err.contains("https://"),
        "{err}"
    );
    let err = InfluxQuery::new(&cfg(&closed_url()))
        .expect("client")
        .query(&q)
        .expect_err("down")
        .to_string();
    assert!(err.contains("unavailable"), "{err}");
}

#[test]
fn empty_answers_and_empty_ranges() {
    let q = Query {
        device: "sensor-7".into(),
        metric: None,
        from: 0,
        until: 1000,
        window: None,
        limit: 10,
    };
    assert_eq!(
        run(&q, 200, "\r\n".into()).0.expect("query"),
        (vec![], false)
    );
    assert_eq!(
        run(&q, 200, String::new()).0.expect("query"),
        (vec![], false)
    );
    // Beyond what InfluxDB can hold: no request at all.
    let late = Query {
        from: MAX_TIME_MS + 1,
        until: u64::MAX,
        ..q
    };
    let (result, req) = run(&late, 200, String::new());
    assert_eq!(result.expect("query"), (vec![], false));
    assert!(req.is_none());
}
