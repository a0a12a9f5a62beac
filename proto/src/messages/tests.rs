//! Round-trip and golden JSON tests: a change to the wire shows up here as a diff.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::*;
use crate::{ErrorCode, ProtoError};

/// Serializes `value`, compares it with `golden`, and parses `golden` back into a value
/// equal to the original.
fn golden<T>(value: T, golden: serde_json::Value)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let encoded = serde_json::to_value(&value).unwrap();
    assert_eq!(encoded, golden, "wire format changed");
    let text = serde_json::to_string(&value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(back, value, "round trip");
    let from_golden: T = serde_json::from_value(golden).unwrap();
    assert_eq!(from_golden, value, "golden parses");
}

fn app() -> AppRef {
    AppRef {
        name: "myapp".into(),
        deploy_to: "/srv/myapp".into(),
        instance: None,
    }
}

fn app_json() -> serde_json::Value {
    json!({"name": "myapp", "deploy_to": "/srv/myapp"})
}

fn spec() -> ReleaseSpec {
    ReleaseSpec {
        shared: vec!["log".into(), ".env".into()],
        migrate: Some("bin/migrate".into()),
        restart: Some("sudo systemctl restart myapp".into()),
        stop: None,
        command_timeout_ms: 300_000,
        keep_releases: 5,
        health: Some(health()),
        max_unpacked_bytes: 1 << 30,
        compose: None,
        instance: None,
        redact: Vec::new(),
        hooks: None,
        notify: None,
        cutover: None,
    }
}

fn compose_spec() -> ReleaseSpec {
    ReleaseSpec {
        shared: vec![],
        migrate: None,
        restart: None,
        stop: None,
        compose: Some(ComposeSpec {
            files: vec!["docker-compose.yml".into(), "compose.production.yml".into()],
            env_file: Some(".env.production".into()),
            project: "myapp".into(),
            pull: true,
            command: None,
            zero_downtime: Vec::new(),
            drain_ms: None,
        }),
        ..spec()
    }
}

fn health() -> HealthSpec {
    HealthSpec {
        url: "http://127.0.0.1:4000/api/v1/status/".into(),
        expect_status: 200,
        retries: 12,
        interval_ms: 5000,
        request_timeout_ms: 3000,
        watch_ms: 0,
        watch_failures: 0,
    }
}

fn spec_json() -> serde_json::Value {
    json!({
        "shared": ["log", ".env"],
        "migrate": "bin/migrate",
        "restart": "sudo systemctl restart myapp",
        "stop": null,
        "command_timeout_ms": 300000,
        "keep_releases": 5,
        "health": health_json(),
        "max_unpacked_bytes": 1073741824u64,
        "compose": null,
    })
}

fn compose_spec_json() -> serde_json::Value {
    json!({
        "shared": [],
        "migrate": null,
        "restart": null,
        "stop": null,
        "command_timeout_ms": 300000,
        "keep_releases": 5,
        "health": health_json(),
        "max_unpacked_bytes": 1073741824u64,
        "compose": {
            "files": ["docker-compose.yml", "compose.production.yml"],
            "env_file": ".env.production",
            "project": "myapp",
            "pull": true,
            "command": null,
        },
    })
}

fn health_json() -> serde_json::Value {
    json!({
        "url": "http://127.0.0.1:4000/api/v1/status/",
        "expect_status": 200,
        "retries": 12,
        "interval_ms": 5000,
        "request_timeout_ms": 3000,
    })
}

fn release_info() -> ReleaseInfo {
    ReleaseInfo {
        id: "20261122214450".into(),
        version: Some("abc123".into()),
        sha256: Some("ab".repeat(32)),
        created: "2026-11-22T21:44:50Z".into(),
        status: ReleaseStatus::Live,
        current: true,
        content: Some("c1:".to_owned() + &"ef".repeat(32)),
    }
}

fn release_info_json() -> serde_json::Value {
    json!({
        "id": "20261122214450",
        "version": "abc123",
        "sha256": "ab".repeat(32),
        "created": "2026-11-22T21:44:50Z",
        "status": "live",
        "current": true,
        "content": "c1:".to_owned() + &"ef".repeat(32),
    })
}

fn history_entry() -> HistoryEntry {
    HistoryEntry {
        action: Action::Deploy,
        release: "20261122214450".into(),
        version: Some("v2".into()),
        previous: Some("20261122214000".into()),
        outcome: Outcome::RolledBack,
        holder: "ci@runner".into(),
        started: "2026-11-22T21:44:50Z".into(),
        finished: "2026-11-22T21:45:50Z".into(),
        error: Some("health check failed".into()),
        origin: None,
        instance: None,
    }
}

fn history_entry_json() -> serde_json::Value {
    json!({
        "action": "deploy",
        "release": "20261122214450",
        "version": "v2",
        "previous": "20261122214000",
        "outcome": "rolled_back",
        "holder": "ci@runner",
        "started": "2026-11-22T21:44:50Z",
        "finished": "2026-11-22T21:45:50Z",
        "error": "health check failed",
    })
}

fn lock_info() -> LockInfo {
    LockInfo {
        holder: "alice@laptop".into(),
        version: Some("v3".into()),
        since: "2026-11-22T21:44:50Z".into(),
    }
}

fn lock_info_json() -> serde_json::Value {
    json!({"holder": "alice@laptop", "version": "v3", "since": "2026-11-22T21:44:50Z"})
}

fn health_report() -> HealthReport {
    HealthReport {
        url: "http://127.0.0.1:4000/api/v1/status/".into(),
        healthy: false,
        attempts: 12,
        last_status: Some(503),
        last_error: None,
        body_snippet: Some("down".into()),
    }
}

fn health_report_json() -> serde_json::Value {
    json!({
        "url": "http://127.0.0.1:4000/api/v1/status/",
        "healthy": false,
        "attempts": 12,
        "last_status": 503,
        "last_error": null,
        "body_snippet": "down",
    })
}

#[test]
fn hello() {
    golden(
        Request::Hello(Hello {
            protocol: 1,
            version: "0.1.0".into(),
        }),
        json!({"type": "hello", "params": {"protocol": 1, "version": "0.1.0"}}),
    );
    golden(
        Response::Hello(HelloReply {
            protocol: 1,
            version: "0.1.0".into(),
            hostname: "web-1".into(),
        }),
        json!({"type": "hello", "params": {"protocol": 1, "version": "0.1.0", "hostname": "web-1"}}),
    );
}

#[test]
fn check() {
    golden(
        Request::Check(Check {
            deploy_to: Some("/srv/myapp".into()),
        }),
        json!({"type": "check", "params": {"deploy_to": "/srv/myapp"}}),
    );
    golden(
        Response::Check(CheckReply {
            agent_version: "0.1.0".into(),
            protocol: 1,
            deploy_to: Some(PathCheck {
                path: "/srv/myapp".into(),
                allowed: true,
                free_bytes: Some(1 << 30),
                exists: false,
            }),
            allowed_roots: Vec::new(),
            roots_from: None,
        }),
        json!({"type": "check", "params": {
            "agent_version": "0.1.0",
            "protocol": 1,
            "deploy_to": {"path": "/srv/myapp", "allowed": true, "free_bytes": 1073741824u64, "exists": false},
        }}),
    );
    // See: #18 (the agent's allowed roots and where they come from, for `check`)
    golden(
        Response::Check(CheckReply {
            agent_version: "0.1.0".into(),
            protocol: 1,
            deploy_to: None,
            allowed_roots: vec!["/srv".into(), "/opt/apps".into()],
            roots_from: Some("--allowed-root flags".into()),
        }),
        json!({"type": "check", "params": {
            "agent_version": "0.1.0",
            "protocol": 1,
            "deploy_to": null,
            "allowed_roots": ["/srv", "/opt/apps"],
            "roots_from": "--allowed-root flags",
        }}),
    );
}

#[test]
fn lock_and_unlock() {
    golden(
        Request::Lock(Lock {
            app: app(),
            holder: "alice@laptop".into(),
            version: Some("v3".into()),
            wait_ms: 0,
        }),
        json!({"type": "lock", "params": {
            "app": app_json(), "holder": "alice@laptop", "version": "v3", "wait_ms": 0,
        }}),
    );
    golden(
        Response::Lock(lock_info()),
        json!({"type": "lock", "params": lock_info_json()}),
    );
    golden(
        Request::Unlock(Unlock { app: app() }),
        json!({"type": "unlock", "params": {"app": app_json()}}),
    );
    golden(
        Response::Unlocked(Unlocked { released: true }),
        json!({"type": "unlocked", "params": {"released": true}}),
    );
}

#[test]
fn push_and_upload_end() {
    golden(
        Request::Push(Push {
            app: app(),
            release: "20261122214450".into(),
            version: Some("abc123".into()),
            holder: "ci@runner".into(),
            size: 1234,
            skip_migrations: false,
            spec: spec(),
            expect_content: None,
            origin: None,
            check: StreamCheck::Sha256,
        }),
        json!({"type": "push", "params": {
            "app": app_json(),
            "release": "20261122214450",
            "version": "abc123",
            "holder": "ci@runner",
            "size": 1234,
            "skip_migrations": false,
            "spec": spec_json(),
        }}),
    );
    golden(
        Response::PushReady(PushReady {
            previous: Some("20261122214000".into()),
        }),
        json!({"type": "push_ready", "params": {"previous": "20261122214000"}}),
    );
    golden(
        Request::UploadEnd(UploadEnd {
            sha256: "cd".repeat(32),
            size: 1234,
            crc32: None,
        }),
        json!({"type": "upload_end", "params": {"sha256": "cd".repeat(32), "size": 1234}}),
    );
}

#[test]
fn a_crc32_checked_upload_says_so_and_older_peers_read_it() {
    // See: #14 (item 1). The agent checks a CRC-32 of the stream instead of a second
    // SHA-256 pass; a controller that does not say so gets the sha256 check.
    let push = Push {
        app: app(),
        release: "20261122214450".into(),
        version: None,
        holder: "ci@runner".into(),
        size: 1234,
        skip_migrations: false,
        spec: spec(),
        expect_content: None,
        origin: None,
        check: StreamCheck::Crc32,
    };
    let v = serde_json::to_value(Request::Push(push.clone())).unwrap();
    assert_eq!(v["params"]["check"], "crc32");
    let mut older = v.clone();
    older["params"].as_object_mut().unwrap().remove("check");
    match serde_json::from_value::<Request>(older).unwrap() {
        Request::Push(p) => assert_eq!(p.check, StreamCheck::Sha256),
        other => panic!("{other:?}"),
    }
    golden(
        Request::UploadEnd(UploadEnd {
            sha256: "cd".repeat(32),
            size: 1234,
            crc32: Some(0xdead_beef),
        }),
        json!({"type": "upload_end", "params": {
            "sha256": "cd".repeat(32), "size": 1234, "crc32": 0xdead_beef_u32}}),
    );
}

#[test]
fn compose_push_and_rollback() {
    golden(
        Request::Push(Push {
            app: app(),
            release: "20261122214450".into(),
            version: Some("abc123".into()),
            holder: "ci@runner".into(),
            size: 512,
            skip_migrations: false,
            spec: compose_spec(),
            expect_content: None,
            origin: None,
            check: StreamCheck::Sha256,
        }),
        json!({"type": "push", "params": {
            "app": app_json(),
            "release": "20261122214450",
            "version": "abc123",
            "holder": "ci@runner",
            "size": 512,
            "skip_migrations": false,
            "spec": compose_spec_json(),
        }}),
    );
    let mut spec = compose_spec();
    if let Some(c) = spec.compose.as_mut() {
        c.command = Some("docker-compose".into());
        c.pull = false;
    }
    let mut spec_json = compose_spec_json();
    spec_json["compose"]["command"] = json!("docker-compose");
    spec_json["compose"]["pull"] = json!(false);
    golden(
        Request::Rollback(Rollback {
            app: app(),
            to: None,
            holder: "alice@laptop".into(),
            spec,
        }),
        json!({"type": "rollback", "params": {
            "app": app_json(), "to": null, "holder": "alice@laptop", "spec": spec_json,
        }}),
    );
}

#[test]
fn compose_zero_downtime() {
    // Optional: absent from the wire when not set (the goldens above), present when set.
    let mut spec = compose_spec();
    if let Some(c) = spec.compose.as_mut() {
        c.zero_downtime = vec!["web".into(), "api".into()];
        c.drain_ms = Some(5000);
    }
    let mut spec_json = compose_spec_json();
    spec_json["compose"]["zero_downtime"] = json!(["web", "api"]);
    spec_json["compose"]["drain_ms"] = json!(5000);
    golden(
        Request::Rollback(Rollback {
            app: app(),
            to: None,
            holder: "alice@laptop".into(),
            spec,
        }),
        json!({"type": "rollback", "params": {
            "app": app_json(), "to": null, "holder": "alice@laptop", "spec": spec_json,
        }}),
    );
}

#[test]
fn rollback() {
    golden(
        Request::Rollback(Rollback {
            app: app(),
            to: Some("v1".into()),
            holder: "alice@laptop".into(),
            spec: spec(),
        }),
        json!({"type": "rollback", "params": {
            "app": app_json(), "to": "v1", "holder": "alice@laptop", "spec": spec_json(),
        }}),
    );
}

#[test]
fn cutover_spec() {
    // Absent: the spec's wire form is unchanged (see `spec_json`).
    let mut spec = spec();
    spec.restart = None;
    spec.cutover = Some(CutoverSpec {
        ports: [4001, 4002],
        start: "sudo systemctl start myapp@${DEPLOY_PORT}".into(),
        stop: "sudo systemctl stop myapp@${DEPLOY_PORT}".into(),
        switch: "bin/point-proxy ${DEPLOY_PORT}".into(),
        drain_ms: 10_000,
    });
    let mut spec_json = spec_json();
    spec_json["restart"] = json!(null);
    spec_json["cutover"] = json!({
        "ports": [4001, 4002],
        "start": "sudo systemctl start myapp@${DEPLOY_PORT}",
        "stop": "sudo systemctl stop myapp@${DEPLOY_PORT}",
        "switch": "bin/point-proxy ${DEPLOY_PORT}",
        "drain_ms": 10000,
    });
    golden(spec, spec_json);
}

#[test]
fn deploy_report() {
    golden(
        Response::Deploy(DeployReport {
            release: "20261122214450".into(),
            version: Some("v3".into()),
            outcome: Outcome::RolledBack,
            previous: Some("20261122214000".into()),
            current: Some("20261122214000".into()),
            steps: vec![StepReport {
                stage: Stage::Restart,
                command: Some("bin/restart".into()),
                success: true,
                exit_code: Some(0),
                output: "restarted\n".into(),
                duration_ms: 12,
                error: None,
            }],
            health: Some(health_report()),
            error: Some("health check failed after 12 attempts".into()),
            duration_ms: 60_500,
        }),
        json!({"type": "deploy", "params": {
            "release": "20261122214450",
            "version": "v3",
            "outcome": "rolled_back",
            "previous": "20261122214000",
            "current": "20261122214000",
            "steps": [{
                "stage": "restart",
                "command": "bin/restart",
                "success": true,
                "exit_code": 0,
                "output": "restarted\n",
                "duration_ms": 12,
                "error": null,
            }],
            "health": health_report_json(),
            "error": "health check failed after 12 attempts",
            "duration_ms": 60500,
        }}),
    );
}

#[test]
fn event() {
    golden(
        Response::Event(Event {
            stage: Stage::Health,
            message: "attempt 3/12: 503".into(),
        }),
        json!({"type": "event", "params": {"stage": "health", "message": "attempt 3/12: 503"}}),
    );
    golden(
        Response::Event(Event {
            stage: Stage::Validate,
            message: "docker-compose config -q".into(),
        }),
        json!({"type": "event", "params": {"stage": "validate", "message": "docker-compose config -q"}}),
    );
    golden(
        Response::Event(Event {
            stage: Stage::Pull,
            message: "pulling".into(),
        }),
        json!({"type": "event", "params": {"stage": "pull", "message": "pulling"}}),
    );
}

#[test]
fn status() {
    golden(
        Request::Status(Status {
            app: app(),
            health: Some(health()),
        }),
        json!({"type": "status", "params": {"app": app_json(), "health": health_json()}}),
    );
    golden(
        Response::Status(StatusReply {
            current: Some(release_info()),
            last: Some(history_entry()),
            lock: Some(lock_info()),
            health: Some(health_report()),
            watch: None,
        }),
        json!({"type": "status", "params": {
            "current": release_info_json(),
            "last": history_entry_json(),
            "lock": lock_info_json(),
            "health": health_report_json(),
        }}),
    );
}

#[test]
fn health_watch_and_watch_status() {
    // The watch keys travel only when set: a spec without them is the old wire format.
    let watched = HealthSpec {
        watch_ms: 300_000,
        watch_failures: 3,
        ..health()
    };
    let mut json = health_json();
    json["watch_ms"] = json!(300_000);
    json["watch_failures"] = json!(3);
    golden(watched, json);
    golden(
        Response::Status(StatusReply {
            current: None,
            last: None,
            lock: None,
            health: None,
            watch: Some(WatchStatus {
                release: "20261122214501".into(),
                state: WatchState::Watching,
                until: "2026-11-22T21:50:01Z".into(),
                remaining_ms: 120_000,
                failures: 1,
                max_failures: 3,
                note: None,
            }),
        }),
        json!({"type": "status", "params": {
            "current": null, "last": null, "lock": null, "health": null,
            "watch": {
                "release": "20261122214501",
                "state": "watching",
                "until": "2026-11-22T21:50:01Z",
                "remaining_ms": 120000,
                "failures": 1,
                "max_failures": 3,
            },
        }}),
    );
    for (state, name) in [
        (WatchState::Passed, "passed"),
        (WatchState::RolledBack, "rolled_back"),
        (WatchState::RollbackFailed, "rollback_failed"),
        (WatchState::Ended, "ended"),
    ] {
        golden(state, json!(name));
    }
}

#[test]
fn releases() {
    golden(
        Request::Releases(Releases { app: app() }),
        json!({"type": "releases", "params": {"app": app_json()}}),
    );
    golden(
        Response::Releases(ReleasesReply {
            releases: vec![release_info()],
        }),
        json!({"type": "releases", "params": {"releases": [release_info_json()]}}),
    );
}

#[test]
fn history() {
    golden(
        Request::History(History {
            app: app(),
            limit: 20,
        }),
        json!({"type": "history", "params": {"app": app_json(), "limit": 20}}),
    );
    golden(
        Response::History(HistoryReply {
            entries: vec![history_entry()],
            skipped_lines: 0,
        }),
        json!({"type": "history", "params": {"entries": [history_entry_json()]}}),
    );
    golden(
        Response::History(HistoryReply {
            entries: vec![],
            skipped_lines: 2,
        }),
        json!({"type": "history", "params": {"entries": [], "skipped_lines": 2}}),
    );
}

#[test]
fn error() {
    golden(
        Response::Error(
            ProtoError::new(ErrorCode::Locked, "app myapp is locked")
                .with("holder", "alice@laptop"),
        ),
        json!({"type": "error", "params": {
            "code": "locked", "message": "app myapp is locked", "details": {"holder": "alice@laptop"},
        }}),
    );
    // details may be omitted
    let e: ProtoError =
        serde_json::from_value(json!({"code": "internal", "message": "boom"})).unwrap();
    assert_eq!(e, ProtoError::new(ErrorCode::Internal, "boom"));
}

#[test]
fn release_info_current_defaults_to_false() {
    // release.json on disk carries no `current` flag.
    let mut on_disk = release_info_json();
    on_disk.as_object_mut().unwrap().remove("current");
    let info: ReleaseInfo = serde_json::from_value(on_disk).unwrap();
    assert!(!info.current);
}

#[test]
fn rpc_ties_each_request_to_its_response() {
    let ok = Response::Unlocked(Unlocked { released: false });
    assert_eq!(
        Unlock::unwrap_response(ok.clone()),
        Ok(Unlocked { released: false })
    );
    // any other answer is handed back for the caller to report
    assert_eq!(Status::unwrap_response(ok.clone()), Err(Box::new(ok)));
    let push: Request = Push {
        app: app(),
        release: "1".into(),
        version: None,
        holder: "h".into(),
        size: 0,
        skip_migrations: true,
        spec: spec(),
        expect_content: None,
        origin: None,
        check: StreamCheck::Sha256,
    }
    .into();
    assert!(matches!(push, Request::Push(_)));
}

#[test]
fn promoted_push_and_fetch() {
    let origin = Origin {
        environment: Some("staging".into()),
        release: Some("20261122214000".into()),
        live_since: Some("2026-11-22T21:40:10Z".into()),
        forced: false,
    };
    let origin_json = json!({
        "environment": "staging",
        "release": "20261122214000",
        "live_since": "2026-11-22T21:40:10Z",
        "forced": false,
    });
    golden(
        Request::Push(Push {
            app: app(),
            release: "20261122214450".into(),
            version: Some("v1.2.0".into()),
            holder: "ci@runner".into(),
            size: 99,
            skip_migrations: false,
            spec: spec(),
            expect_content: Some("c1:00".into()),
            origin: Some(origin.clone()),
            check: StreamCheck::Sha256,
        }),
        json!({"type": "push", "params": {
            "app": app_json(),
            "release": "20261122214450",
            "version": "v1.2.0",
            "holder": "ci@runner",
            "size": 99,
            "skip_migrations": false,
            "spec": spec_json(),
            "expect_content": "c1:00",
            "origin": origin_json.clone(),
        }}),
    );
    let mut entry = history_entry();
    entry.origin = Some(origin);
    let mut entry_json = history_entry_json();
    entry_json["origin"] = origin_json;
    golden(entry, entry_json);
    golden(
        Request::Fetch(Fetch {
            app: app(),
            release: "20261122214000".into(),
        }),
        json!({"type": "fetch", "params": {"app": app_json(), "release": "20261122214000"}}),
    );
    golden(
        Response::FetchReady(FetchReady {
            release: release_info(),
        }),
        json!({"type": "fetch_ready", "params": {"release": release_info_json()}}),
    );
    golden(
        Response::FetchEnd(FetchEnd {
            sha256: "12".repeat(32),
            size: 7,
        }),
        json!({"type": "fetch_end", "params": {"sha256": "12".repeat(32), "size": 7}}),
    );
}

#[test]
fn review_apps() {
    // An instance rides on AppRef; without one the JSON is what it always was.
    let mut inst = app();
    inst.instance = Some("pr-42".into());
    let mut inst_json = app_json();
    inst_json["instance"] = json!("pr-42");
    let mut spec = spec();
    spec.instance = Some(InstanceSpec {
        first_port: 4100,
        last_port: 4199,
        ttl_ms: Some(604_800_000),
    });
    let mut spec_json = spec_json();
    spec_json["instance"] = json!({"first_port": 4100, "last_port": 4199, "ttl_ms": 604800000u64});
    golden(
        Request::Rollback(Rollback {
            app: inst.clone(),
            to: None,
            holder: "ci@runner".into(),
            spec: spec.clone(),
        }),
        json!({"type": "rollback", "params": {
            "app": inst_json.clone(), "to": null, "holder": "ci@runner", "spec": spec_json.clone(),
        }}),
    );
    golden(
        Request::Destroy(Destroy {
            app: inst.clone(),
            holder: "ci@runner".into(),
            spec,
        }),
        json!({"type": "destroy", "params": {
            "app": inst_json.clone(), "holder": "ci@runner", "spec": spec_json,
        }}),
    );
    golden(
        Response::Destroyed(Destroyed {
            existed: true,
            port: Some(4100),
            release: Some("20261122214450".into()),
            steps: vec![],
        }),
        json!({"type": "destroyed", "params": {
            "existed": true, "port": 4100, "release": "20261122214450", "steps": [],
        }}),
    );
    golden(
        Request::Instances(Instances { app: app() }),
        json!({"type": "instances", "params": {"app": app_json()}}),
    );
    golden(
        Response::Instances(InstancesReply {
            instances: vec![InstanceInfo {
                name: "pr-42".into(),
                port: Some(4100),
                current: Some(release_info()),
                last: Some(history_entry()),
                touched: Some("2026-11-22T21:44:50Z".into()),
                expires: None,
                lock: None,
            }],
        }),
        json!({"type": "instances", "params": {"instances": [{
            "name": "pr-42",
            "port": 4100,
            "current": release_info_json(),
            "last": history_entry_json(),
            "touched": "2026-11-22T21:44:50Z",
            "expires": null,
            "lock": null,
        }]}}),
    );
    let mut entry = history_entry();
    entry.action = Action::Expire;
    entry.outcome = Outcome::Removed;
    entry.instance = Some("pr-42".into());
    let mut entry_json = history_entry_json();
    entry_json["action"] = json!("expire");
    entry_json["outcome"] = json!("removed");
    entry_json["instance"] = json!("pr-42");
    golden(entry, entry_json);
    assert_eq!(
        serde_json::to_value(Action::Destroy).unwrap(),
        json!("destroy")
    );
}

#[test]
fn instance_names_are_dns_labels() {
    let max = "a".repeat(63);
    for ok in ["pr-42", "a", "0", "current", "20261122214450", &max] {
        assert_eq!(instance_name_problem(ok), None, "{ok}");
    }
    let over = "a".repeat(64);
    let bad = [
        "", "../x", "PR_1", "a.b", "a b", "-a", "a-", "a/b", ".", "..", "é", &over,
    ];
    for bad in bad {
        let why = instance_name_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(why.contains("DNS label"), "{why}");
    }
}

#[test]
fn delta_offer_and_need() {
    use crate::manifest::Entry;
    golden(
        Request::DeltaOffer(DeltaOffer {
            entries: vec![
                Entry::File {
                    path: "bin/run".into(),
                    mode: 0o755,
                    size: 12,
                    sha256: "aa".repeat(32),
                },
                Entry::Symlink {
                    path: "bin/start".into(),
                    target: "run".into(),
                },
            ],
            dirs: vec![DirEntry {
                path: "bin".into(),
                mode: 0o755,
            }],
            artifact_sha256: "bb".repeat(32),
            artifact_size: 4096,
        }),
        json!({"type": "delta_offer", "params": {
            "entries": [
                {"kind": "file", "path": "bin/run", "mode": 493, "size": 12, "sha256": "aa".repeat(32)},
                {"kind": "symlink", "path": "bin/start", "target": "run"},
            ],
            "dirs": [{"path": "bin", "mode": 493}],
            "artifact_sha256": "bb".repeat(32),
            "artifact_size": 4096,
        }}),
    );
    golden(
        Response::DeltaNeed(DeltaNeed { files: vec![0, 7] }),
        json!({"type": "delta_need", "params": {"files": [0, 7]}}),
    );
}

#[test]
fn delta_plan() {
    use crate::manifest::Entry;
    golden(
        Request::DeltaPlan(DeltaPlan {
            app: app(),
            offer: DeltaOffer {
                entries: vec![Entry::File {
                    path: "VERSION".into(),
                    mode: 0o644,
                    size: 3,
                    sha256: "cc".repeat(32),
                }],
                dirs: Vec::new(),
                artifact_sha256: "dd".repeat(32),
                artifact_size: 512,
            },
        }),
        json!({"type": "delta_plan", "params": {
            "app": app_json(),
            "offer": {
                "entries": [
                    {"kind": "file", "path": "VERSION", "mode": 420, "size": 3, "sha256": "cc".repeat(32)},
                ],
                "dirs": [],
                "artifact_sha256": "dd".repeat(32),
                "artifact_size": 512,
            },
        }}),
    );
}

#[test]
fn hooks_and_notify_are_optional_spec_fields() {
    let with = ReleaseSpec {
        hooks: Some(HooksSpec {
            before_switch: Some("bin/check".into()),
            after_live: Some("bin/announce".into()),
            on_failure: None,
        }),
        notify: Some(NotifySpec {
            webhooks: vec!["https://hooks.example.com/T0/B0/secret".into()],
            environment: "production".into(),
        }),
        ..spec()
    };
    let mut json = spec_json();
    json["hooks"] = json!({"before_switch": "bin/check", "after_live": "bin/announce"});
    json["notify"] = json!({
        "webhooks": ["https://hooks.example.com/T0/B0/secret"],
        "environment": "production",
    });
    golden(with.clone(), json);
    // An older controller sends neither: both absent.
    golden(spec(), spec_json());
    // The URL is a secret: Debug does not show it.
    let shown = format!("{:?}", with.notify.unwrap());
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("1 hidden"), "{shown}");
    golden(
        Event {
            stage: Stage::Hook,
            message: "running `bin/check`".into(),
        },
        json!({"stage": "hook", "message": "running `bin/check`"}),
    );
}
