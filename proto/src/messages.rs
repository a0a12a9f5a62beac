//! Every message on the wire. Requests are one serde enum tagged
//! `{"type": ..., "params": ...}`; each request struct is tied to its response type by
//! [`Rpc`].
//!
//! Durations travel as milliseconds, times as RFC 3339 UTC strings, sizes as bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// A request ties itself to the one response type that answers it.
pub trait Rpc: Into<Request> {
    type Response: DeserializeOwned;
    /// Picks this request's answer out of a [`Response`]; any other variant is
    /// handed back unchanged so the caller can report it.
    fn unwrap_response(response: Response) -> Result<Self::Response, Box<Response>>;
}

macro_rules! rpc {
    ($req:ident => $variant:ident($resp:ty)) => {
        impl From<$req> for Request {
            fn from(r: $req) -> Self {
                Request::$req(r)
            }
        }
        impl Rpc for $req {
            type Response = $resp;
            fn unwrap_response(response: Response) -> Result<$resp, Box<Response>> {
                match response {
                    Response::$variant(r) => Ok(r),
                    other => Err(Box::new(other)),
                }
            }
        }
    };
}

/// What the controller sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "params", rename_all = "snake_case")]
pub enum Request {
    Hello(Hello),
    Check(Check),
    Lock(Lock),
    Unlock(Unlock),
    /// Starts an upload: binary frames follow, then [`Request::UploadEnd`].
    Push(Push),
    UploadEnd(UploadEnd),
    Rollback(Rollback),
    Status(Status),
    Releases(Releases),
    History(History),
    /// Streams a release's content back (for `promote`): [`FetchReady`], binary frames,
    /// then [`FetchEnd`].
    Fetch(Fetch),
    /// Right after `PushReady`, before any data: what the artifact holds, so the agent
    /// can say which files it already has (delta upload).
    DeltaOffer(DeltaOffer),
    /// Stops and removes a review-app instance, and frees its port.
    Destroy(Destroy),
    /// Lists the review-app instances of an app.
    Instances(Instances),
    /// Read-only (`--plan`): which files of an offer a push would have to carry, asked
    /// outside any upload. Answered with [`DeltaNeed`]; changes nothing on the host.
    DeltaPlan(DeltaPlan),
    /// Streams the app's log lines ([`Output`]s), then [`LogsEnd`].
    Logs(Logs),
    /// Runs a one-off command in a release: [`Output`]s, then [`ExecEnd`].
    Exec(Exec),
}

/// What the agent sends.
// One response per request, moved once: boxing the big ones (`Status`) buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "params", rename_all = "snake_case")]
pub enum Response {
    Hello(HelloReply),
    Check(CheckReply),
    Lock(LockInfo),
    Unlocked(Unlocked),
    PushReady(PushReady),
    Deploy(DeployReport),
    Status(StatusReply),
    Releases(ReleasesReply),
    History(HistoryReply),
    FetchReady(FetchReady),
    FetchEnd(FetchEnd),
    DeltaNeed(DeltaNeed),
    Destroyed(Destroyed),
    Instances(InstancesReply),
    /// Lines of a log or of a command's output; any number precede [`LogsEnd`] or
    /// [`ExecEnd`].
    Output(Output),
    LogsEnd(LogsEnd),
    ExecEnd(ExecEnd),
    /// Progress; any number may precede the final response to a request.
    Event(Event),
    Error(ProtoError),
}

rpc!(Hello => Hello(HelloReply));
rpc!(Fetch => FetchReady(FetchReady));
rpc!(DeltaOffer => DeltaNeed(DeltaNeed));
rpc!(DeltaPlan => DeltaNeed(DeltaNeed));
rpc!(Check => Check(CheckReply));
rpc!(Lock => Lock(LockInfo));
rpc!(Unlock => Unlocked(Unlocked));
rpc!(Push => PushReady(PushReady));
rpc!(UploadEnd => Deploy(DeployReport));
rpc!(Rollback => Deploy(DeployReport));
rpc!(Status => Status(StatusReply));
rpc!(Releases => Releases(ReleasesReply));
rpc!(History => History(HistoryReply));
rpc!(Destroy => Destroyed(Destroyed));
rpc!(Instances => Instances(InstancesReply));
rpc!(Logs => LogsEnd(LogsEnd));
rpc!(Exec => ExecEnd(ExecEnd));

/// The first message of every session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The controller's version, e.g. `0.1.0`.
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol: u32,
    /// The agent's version.
    pub version: String,
    pub hostname: String,
}

/// Which app on the server a request is about. The agent refuses a `deploy_to`
/// outside its `allowed_roots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRef {
    pub name: String,
    pub deploy_to: String,
    /// A review-app instance of the app (a DNS-safe label, see [`instance_name_problem`]):
    /// it lives in `<deploy_to>/instances/<name>/`, with its own releases, `current`,
    /// lock, journal and history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Why `name` is not a valid instance name, or `None` when it is one: a DNS label of
/// 1 to 63 lowercase letters, digits and `-`, neither starting nor ending with `-`.
/// Both sides check it; it is what keeps an instance inside `<deploy_to>/instances/`.
pub fn instance_name_problem(name: &str) -> Option<String> {
    let why = if name.is_empty() {
        "it is empty"
    } else if name.len() > 63 {
        "it is longer than 63 characters"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        "only lowercase letters, digits and `-` are allowed"
    } else if name.starts_with('-') || name.ends_with('-') {
        "it starts or ends with `-`"
    } else {
        return None;
    };
    Some(format!(
        "instance name {name:?} is not a DNS label (1-63 of a-z, 0-9 and `-`, e.g. pr-42): {why}"
    ))
}

/// Health and readiness of the agent, and of `deploy_to` when given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub deploy_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    pub agent_version: String,
    pub protocol: u32,
    pub deploy_to: Option<PathCheck>,
    /// The agent's `allowed_roots` (empty from an agent that does not send them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_roots: Vec<String>,
    /// Where they were set: the config file's path, or the `--allowed-root` flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCheck {
    pub path: String,
    /// Inside the agent's `allowed_roots`.
    pub allowed: bool,
    /// Free bytes on the filesystem that holds the path (or its nearest existing parent).
    pub free_bytes: Option<u64>,
    pub exists: bool,
}

/// Takes the app's deploy lock for this session. It is freed by [`Unlock`], or when
/// the session ends, whichever comes first (a deploy in flight keeps it until it ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub app: AppRef,
    /// Who is deploying, e.g. `alice@laptop` or `github:org/repo#123`.
    pub holder: String,
    pub version: Option<String>,
    /// How long to wait for a held lock; 0 fails at once with [`crate::ErrorCode::Locked`].
    pub wait_ms: u64,
}

/// Who holds a lock. Also the answer to [`Lock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub holder: String,
    pub version: Option<String>,
    /// RFC 3339.
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unlock {
    pub app: AppRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unlocked {
    pub released: bool,
}

/// How to run a release: what the agent needs to deploy or roll back on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// Paths under `<deploy_to>/shared` linked into each release.
    pub shared: Vec<String>,
    pub migrate: Option<String>,
    pub restart: Option<String>,
    pub stop: Option<String>,
    /// Limit for each command the agent runs.
    pub command_timeout_ms: u64,
    pub keep_releases: u32,
    pub health: Option<HealthSpec>,
    /// Cap on the unpacked size of a release; the agent's own cap applies too.
    pub max_unpacked_bytes: u64,
    /// Set for `strategy = "compose"`: the release is a compose project, and
    /// "restart" means `up` with its files. `restart` is then not used.
    pub compose: Option<ComposeSpec>,
    /// Set for a review-app instance ([`AppRef::instance`]): where its port comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceSpec>,
    /// Secret values (the controller's `secrets`, env-file values) the agent masks in
    /// its own log, in events, step reports and history. Never written to disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
    /// `[release] hooks`: commands the agent runs around the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<HooksSpec>,
    /// `[notify]`: where the agent posts each outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
    /// Set with `[cutover]` (release strategy): the release starts on the idle slot
    /// beside the serving one, and `restart` is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<CutoverSpec>,
}

/// Commands the agent runs in the release dir with the deploy variables. `before_switch`
/// failing stops the deploy before `current` moves; `after_live` and `on_failure` (with
/// `DEPLOY_OUTCOME`) are reported and never change the outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HooksSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_switch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_live: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
}

/// Webhooks the agent posts one JSON document to per outcome. The URLs are secrets
/// (Slack's carry a token): `Debug` does not show them, and the agent never logs them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifySpec {
    pub webhooks: Vec<String>,
    /// The controller's environment name, for the document.
    pub environment: String,
}

impl std::fmt::Debug for NotifySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifySpec")
            .field(
                "webhooks",
                &format_args!("[{} hidden]", self.webhooks.len()),
            )
            .field("environment", &self.environment)
            .finish()
    }
}

/// Blue/green slots for the release strategy (`[cutover]`): two ports, the commands
/// that start and stop a slot and point the proxy at one, and the drain time. Each
/// command gets `DEPLOY_PORT` (the slot it is about) and `DEPLOY_PREVIOUS_PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutoverSpec {
    /// Exactly two distinct ports; the first cutover deploy uses the first.
    pub ports: [u16; 2],
    pub start: String,
    pub stop: String,
    pub switch: String,
    /// How long the old slot keeps running after `switch`.
    pub drain_ms: u64,
}

/// The review-app settings of an environment, sent with every push so the agent can
/// give a new instance a port and expire idle ones on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The port pool, both ends included (`instance_ports = "4100-4199"`).
    pub first_port: u16,
    pub last_port: u16,
    /// `instance_ttl`: the agent destroys an instance no deploy touched for this long.
    pub ttl_ms: Option<u64>,
}

/// How to run a release that holds a compose project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComposeSpec {
    /// File names inside the release dir, passed as `-f` in this order.
    pub files: Vec<String>,
    /// File name inside the release dir, passed as `--env-file`.
    pub env_file: Option<String>,
    /// Passed as `-p`.
    pub project: String,
    /// Run `pull` before the switch.
    pub pull: bool,
    /// `"docker compose"` (v2) or `"docker-compose"` (v1); `None`: the agent detects it.
    pub command: Option<String>,
    /// `zero_downtime`: services rolled out with a second container beside the old one
    /// (healthy first, then both serve for the drain, then the old one is removed)
    /// instead of being recreated. Empty: every service is recreated (`--force-recreate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zero_downtime: Vec<String>,
    /// How long the old and the new container of a `zero_downtime` service both serve
    /// before the old one is stopped (`compose.drain`). `None`: the agent's default (2 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub url: String,
    pub expect_status: u16,
    pub retries: u32,
    pub interval_ms: u64,
    pub request_timeout_ms: u64,
    /// `health.watch`: after a deploy went live, the agent keeps checking the URL every
    /// `interval_ms` for this long and rolls back on its own after `watch_failures`
    /// consecutive failures. 0: no watch.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub watch_ms: u64,
    /// `health.watch_failures`: consecutive failed checks that roll back (0 when there
    /// is no watch).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub watch_failures: u32,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// Starts a deploy of a release tarball (`.tar.gz`). The agent answers
/// [`PushReady`]; the controller then streams the artifact as binary frames and ends
/// with [`UploadEnd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub app: AppRef,
    /// `YYYYMMDDHHMMSS`, chosen by the controller so every host names it the same.
    pub release: String,
    pub version: Option<String>,
    pub holder: String,
    /// Size of the artifact in bytes, for progress and for the disk-space check.
    pub size: u64,
    pub skip_migrations: bool,
    pub spec: ReleaseSpec,
    /// When set, the unpacked release must have this content digest, or the push is
    /// refused before anything switches (used by `promote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_content: Option<String>,
    /// Where this release came from, recorded in history (`promote`, `--force`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// How the agent checks the uploaded bytes against [`UploadEnd`]. Absent (a controller
    /// that predates it): sha256 of the stream.
    #[serde(default, skip_serializing_if = "StreamCheck::is_sha256")]
    pub check: StreamCheck,
}

/// How the agent checks that the upload's bytes are the artifact's, end to end.
///
/// The SSH channel already authenticates every byte; this check catches what goes wrong
/// on either side of it (a lost, repeated or reordered chunk), together with the gzip
/// CRC-32 of each member and the tar structure that unpacking checks anyway. The agent's
/// per-file sha256 (the release's manifest) is the content check; `crc32` spares the
/// agent a second SHA-256 pass over every byte of the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamCheck {
    /// SHA-256 of the stream against [`UploadEnd::sha256`] (and the size).
    #[default]
    Sha256,
    /// CRC-32 (the gzip polynomial) of the stream against [`UploadEnd::crc32`] (and the
    /// size); [`UploadEnd::sha256`] is then recorded as the release's artifact digest.
    Crc32,
}

impl StreamCheck {
    pub fn is_sha256(&self) -> bool {
        *self == StreamCheck::Sha256
    }
}

/// Provenance of a release, kept in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The environment it was promoted from, e.g. `staging`.
    pub environment: Option<String>,
    /// Its release id there.
    pub release: Option<String>,
    /// When it went live there (RFC 3339).
    pub live_since: Option<String>,
    /// Pushed with `--force` past a `promote_from` gate.
    #[serde(default)]
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReady {
    /// The release that `current` pointed at when the upload began.
    pub previous: Option<String>,
}

/// Ends an upload. The agent checks what it received ([`Push::check`]), then deploys and
/// answers with a [`DeployReport`] (preceded by [`Event`]s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadEnd {
    /// Hex sha256 of the artifact as the controller read it.
    pub sha256: String,
    pub size: u64,
    /// CRC-32 of the bytes sent, for [`StreamCheck::Crc32`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

/// Switches `current` to an existing release (or the previous one when `to` is empty),
/// restarts and checks health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub app: AppRef,
    /// A release id or a version label.
    pub to: Option<String>,
    pub holder: String,
    pub spec: ReleaseSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The release is live and healthy.
    Live,
    /// The deploy stopped before the switch; `current` was never touched.
    Failed,
    /// The release went live, failed, and the previous release serves again.
    RolledBack,
    /// Going back failed too: a human must look.
    RollbackFailed,
    /// A review-app instance was stopped and removed (history of `destroy`, expiry).
    Removed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Lock,
    Upload,
    Unpack,
    LinkShared,
    /// Checks before anything changes (compose: Docker reachable, files parse).
    Validate,
    /// `compose pull`, before anything is recreated.
    Pull,
    Migrate,
    Switch,
    Restart,
    Health,
    Rollback,
    Prune,
    Recover,
    /// A `[release] hooks` command.
    Hook,
}

/// One step the agent took, with its command output kept as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    pub stage: Stage,
    pub command: Option<String>,
    pub success: bool,
    pub exit_code: Option<i32>,
    /// The last lines of stdout and stderr, interleaved as written.
    pub output: String,
    pub duration_ms: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub url: String,
    pub healthy: bool,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub body_snippet: Option<String>,
}

/// How a deploy or rollback on one host ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    pub release: String,
    pub version: Option<String>,
    pub outcome: Outcome,
    /// What `current` pointed at before.
    pub previous: Option<String>,
    /// What `current` points at now.
    pub current: Option<String>,
    pub steps: Vec<StepReport>,
    pub health: Option<HealthReport>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub stage: Stage,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub app: AppRef,
    /// When given, the agent checks health once and reports it.
    pub health: Option<HealthSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub current: Option<ReleaseInfo>,
    pub last: Option<HistoryEntry>,
    pub lock: Option<LockInfo>,
    pub health: Option<HealthReport>,
    /// The watch after go-live of the last deploy: under way, or how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchStatus>,
}

/// How the watch of a release after it went live stands (`health.watch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStatus {
    pub release: String,
    pub state: WatchState,
    /// When the watch ends (or ended), RFC 3339 UTC.
    pub until: String,
    /// Time left while `watching`; 0 once it ended.
    pub remaining_ms: u64,
    /// Consecutive failed checks so far.
    pub failures: u32,
    /// How many consecutive failures roll back.
    pub max_failures: u32,
    /// How it ended, in words (the rollback's reason, the push that ended it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchState {
    /// The agent is checking the release.
    Watching,
    /// The whole watch went by without `max_failures` failures in a row.
    Passed,
    /// The watch rolled the release back.
    RolledBack,
    /// The watch rolled back, and the previous release is not healthy either.
    RollbackFailed,
    /// A newer push or rollback ended the watch.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Unpacked and prepared, never confirmed live.
    Prepared,
    /// Confirmed healthy at least once.
    Live,
    /// Stopped before the switch (bad migration, ...).
    Failed,
    /// Went live, failed health, and was switched away from.
    RolledBack,
}

/// The contents of `releases/<id>/.deploy/release.json`, plus whether it is current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub id: String,
    pub version: Option<String>,
    pub sha256: Option<String>,
    pub created: String,
    pub status: ReleaseStatus,
    #[serde(default)]
    pub current: bool,
    /// Digest of what the release holds (see [`crate::manifest`]): equal digests mean
    /// byte-identical content, however the artifact was packed or uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// The artifact's content, entry by entry (files with their sha256, symlinks, and the
/// directories with their modes). The upload that follows then carries only the files
/// the agent asked for; the agent copies the rest from releases it already has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaOffer {
    pub entries: Vec<crate::manifest::Entry>,
    pub dirs: Vec<DirEntry>,
    /// sha256 and size of the whole artifact, recorded in release.json.
    pub artifact_sha256: String,
    pub artifact_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

/// `deployctl push --plan`: the [`DeltaNeed`] a push of `offer` would get now, without
/// starting one (no lock, no partial release, no journal). Only `offer.entries` counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaPlan {
    pub app: AppRef,
    pub offer: DeltaOffer,
}

/// Indices into `DeltaOffer::entries` of the files the upload must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaNeed {
    pub files: Vec<u32>,
}

/// Asks for a release's content as a `.tar.gz` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    pub app: AppRef,
    pub release: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchReady {
    pub release: ReleaseInfo,
}

/// Ends a fetch: what the agent sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchEnd {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releases {
    pub app: AppRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasesReply {
    /// Sorted by id, oldest first.
    pub releases: Vec<ReleaseInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deploy,
    Rollback,
    /// The agent finished or undid a deploy after a restart.
    Recover,
    /// `deployctl destroy --instance`: a review-app instance was removed.
    Destroy,
    /// The agent removed a review-app instance idle for longer than its `instance_ttl`.
    Expire,
}

/// One line of `<deploy_to>/.deploy/history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub action: Action,
    pub release: String,
    pub version: Option<String>,
    pub previous: Option<String>,
    pub outcome: Outcome,
    pub holder: String,
    pub started: String,
    pub finished: String,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// The review-app instance a `destroy` or `expire` entry is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub app: AppRef,
    /// Newest entries, at most this many; 0 means all.
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReply {
    /// Oldest first.
    pub entries: Vec<HistoryEntry>,
    /// Lines of the history file that could not be read (torn, not UTF-8) and were
    /// skipped; the rest is in `entries`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_lines: u64,
}

/// Stops a review-app instance (`stop`, or compose `down -v --remove-orphans`), removes
/// `<deploy_to>/instances/<name>/` and frees its port. Takes the instance's lock.
/// Destroying an instance that does not exist succeeds with `existed: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destroy {
    /// `instance` must be set.
    pub app: AppRef,
    pub holder: String,
    /// Its `stop` command or compose project, as configured now.
    pub spec: ReleaseSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destroyed {
    pub existed: bool,
    /// The port it held, now free.
    pub port: Option<u16>,
    /// The release that was running.
    pub release: Option<String>,
    /// The stop command or `down -v`, with its output.
    pub steps: Vec<StepReport>,
}

/// Lists the review-app instances of `app` (its `instance` is ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instances {
    pub app: AppRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancesReply {
    /// Sorted by name.
    pub instances: Vec<InstanceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub name: String,
    pub port: Option<u16>,
    pub current: Option<ReleaseInfo>,
    /// Its last deploy or rollback.
    pub last: Option<HistoryEntry>,
    /// When the last push or rollback began (RFC 3339): what `instance_ttl` counts from.
    pub touched: Option<String>,
    /// When the agent will expire it, with `instance_ttl` set (RFC 3339).
    pub expires: Option<String>,
    pub lock: Option<LockInfo>,
}

pub use crate::dayops::*;

#[cfg(test)]
mod tests;

fn is_zero(n: &u64) -> bool {
    *n == 0
}
