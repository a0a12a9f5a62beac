//! What a new user sees when something is wrong (issue #18): the "agent not reachable"
//! message names what was tried and the likely cause; the progress display on a real
//! pseudo-terminal.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use deployctl_e2e::require::{in_ci, missing};
use deployctl_e2e::{Output, SshdOptions, bin};

use crate::support::Site;

fn site() -> Site {
    Site::ssh(SshdOptions::default())
}

/// Replaces `agent_socket` (and, when given, `agent_bin`) in the site's deploy.toml.
fn point_at(s: &Site, socket: &str, agent_bin: Option<&str>) {
    let mut cfg = s
        .env
        .read("deploy.toml")
        .replace(s.agent.socket.to_str().unwrap(), socket);
    if let Some(b) = agent_bin {
        cfg = cfg.replace(
            &format!("agent_bin = \"{}\"", bin("deploy-agent").display()),
            &format!("agent_bin = \"{b}\""),
        );
    }
    s.env.write("deploy.toml", cfg);
}

#[track_caller]
fn assert_names(out: &Output, socket: &str, cause: &str) {
    eprintln!("{}", out.stderr);
    out.assert_exit(3);
    assert!(out.stderr.contains(socket), "names the socket: {out}");
    assert!(
        out.stderr.contains("direct-streamlocal") && out.stderr.contains("bridge"),
        "says what was tried (streamlocal, then the bridge): {out}"
    );
    assert!(
        out.stderr.contains(cause),
        "names the cause {cause:?}: {out}"
    );
    assert!(
        !out.stderr.contains("not installed"),
        "the agent IS installed; the socket is the problem: {out}"
    );
}

// See: #18
#[test]
fn wrong_agent_socket_with_the_bridge_installed_names_the_socket() {
    let s = site();
    s.write_config("", "");
    let wrong = s.env.path("nowhere/agent.sock");
    point_at(&s, wrong.to_str().unwrap(), None);
    let out = s.run(&["check", "test"]);
    assert_names(&out, wrong.to_str().unwrap(), "socket missing");
    assert!(out.stderr.contains("agent_socket is wrong"), "{out}");
}

// See: #18
// The issue's case: `deploy-agent` is not on the SSH PATH (it is used only by the bridge
// fallback); the socket path is wrong. This said "deploy-agent is not installed".
#[test]
fn wrong_agent_socket_without_the_bridge_on_path_is_not_called_not_installed() {
    let s = site();
    s.write_config("", "");
    let wrong = s.env.path("nowhere/agent.sock");
    point_at(&s, wrong.to_str().unwrap(), Some("deploy-agent"));
    let out = s.run(&["check", "test"]);
    assert_names(&out, wrong.to_str().unwrap(), "socket missing");
    assert!(out.stderr.contains("agent_socket is wrong"), "{out}");
}

// See: #18
#[test]
fn stopped_agent_is_reported_as_not_running() {
    let mut s = site();
    s.write_config("", "");
    // Point the bridge at a name not on the PATH, as on a host where the agent lives in
    // /usr/local/lib: the old message then said "not installed".
    point_at(
        &s,
        s.agent.socket.clone().to_str().unwrap(),
        Some("deploy-agent"),
    );
    s.agent.kill9(); // a crash: the socket file stays behind, nothing listens on it
    assert!(s.agent.socket.exists());
    let out = s.run(&["check", "test"]);
    assert_names(&out, s.agent.socket.to_str().unwrap(), "not running");
    assert!(out.stderr.contains("stale socket"), "{out}");
}

// See: #18
// The agent is fine, but sshd forbids streamlocal forwarding and the bridge is not on the
// SSH PATH: the fix is agent_bin's full path (or allowing forwarding), not a bootstrap.
#[test]
fn refused_streamlocal_and_no_bridge_on_path_names_both() {
    let s = Site::ssh(SshdOptions {
        allow_streamlocal: false,
        ..Default::default()
    });
    s.write_config("", "");
    point_at(
        &s,
        s.agent.socket.clone().to_str().unwrap(),
        Some("deploy-agent"),
    );
    let out = s.run(&["check", "test"]);
    assert_names(
        &out,
        s.agent.socket.to_str().unwrap(),
        "sshd refused the direct channel",
    );
    assert!(
        out.stderr.contains("set agent_bin to the full path"),
        "{out}"
    );
}

// See: #18
// `hosts = ["local"]` opens the socket itself; its message names the cause too.
#[test]
fn local_host_names_a_missing_or_stale_socket() {
    let mut s = Site::local();
    s.write_config("", "");
    let sock = s.agent.socket.to_str().unwrap().to_owned();
    let wrong = s.env.path("nowhere/agent.sock");
    let cfg = s
        .env
        .read("deploy.toml")
        .replace(&sock, wrong.to_str().unwrap());
    s.env.write("deploy.toml", cfg.clone());
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(out.stderr.contains(wrong.to_str().unwrap()), "{out}");
    assert!(out.stderr.contains("socket missing"), "{out}");
    s.env
        .write("deploy.toml", cfg.replace(wrong.to_str().unwrap(), &sock));
    s.agent.kill9();
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(out.stderr.contains(&sock), "{out}");
    assert!(out.stderr.contains("stale socket"), "{out}");
}

/// A throwaway system user (root only), removed on drop.
struct TempUser(String);

impl TempUser {
    fn create() -> Option<TempUser> {
        let name = format!("dctlux{}", std::process::id() % 100_000);
        let ok = Command::new("useradd")
            .args(["-M", "-d", "/", "-s", "/bin/sh", "-p", "*", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(TempUser(name))
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

// See: #18
// The socket is there and the agent listens, but the SSH user is not in the socket's group
// (mode 0660 root:root): sshd, acting as that user, gets "permission denied".
#[test]
fn socket_the_user_may_not_open_is_reported_as_permission_denied() {
    if !is_root() {
        if missing(
            "root",
            "creates a second SSH user who may not open the agent's socket",
        ) {
            unreachable!();
        }
        return;
    }
    let Some(user) = TempUser::create() else {
        if in_ci() {
            panic!("useradd failed: this test needs a throwaway user (apt-get install passwd)");
        }
        eprintln!("note: skipping: useradd failed");
        return;
    };
    let s = site();
    s.write_config("", "");
    // The socket's directories are searchable by everyone; only the socket (0660
    // root:root) keeps the other user out.
    let mut dir: Option<&Path> = s.agent.socket.parent();
    while let Some(d) = dir {
        if !d.starts_with(s.env.root()) {
            break;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir = d.parent();
    }
    // sshd reads authorized_keys as the user logging in: let the other user read it.
    let sshd_dir = s.sshd().config_path().parent().unwrap().to_owned();
    std::fs::set_permissions(&sshd_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        sshd_dir.join("authorized_keys"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let cfg = s.env.read("deploy.toml").replace(
        &format!("{}@127.0.0.1", s.sshd().user),
        &format!("{}@127.0.0.1", user.0),
    );
    s.env.write("deploy.toml", cfg);
    let out = s.run(&["check", "test"]);
    assert_names(&out, s.agent.socket.to_str().unwrap(), "permission denied");
    assert!(out.stderr.contains(&user.0), "names the user: {out}");
    assert!(
        out.stderr.contains("root:root 660"),
        "shows owner and mode: {out}"
    );
}

// ---------------------------------------------------------------------------------------
// Progress display
// ---------------------------------------------------------------------------------------

/// Deterministic incompressible bytes (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A release: `big` bytes of noise in `big.bin` (the same in every version) FIRST, then a
/// few small files, then `VERSION`, so a delta has to read all of `big.bin` before it
/// finds anything to send.
fn artifact(s: &Site, version: &str, big: usize) -> std::path::PathBuf {
    let path = s.env.path(&format!("{version}.tar.gz"));
    let f = std::fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("big.bin", &noise(7, big));
    for i in 0..20 {
        add(&format!("f{i}"), &noise(100 + i, 2048));
    }
    add("VERSION", format!("{version}\n").as_bytes());
    tar.into_inner().unwrap().finish().unwrap();
    path
}

/// `deployctl ARGS` under a pseudo-terminal (`script` from util-linux): stdin, stdout and
/// stderr are the pty; the captured output is what a terminal would have received.
fn under_pty(s: &Site, args: &[&str], env: &[(&str, &str)]) -> Option<Output> {
    if !deployctl_e2e::require::require(
        "script",
        "runs deployctl under a pseudo-terminal (apt-get install bsdutils)",
    ) {
        return None;
    }
    let mut cmd = shell_quote(bin("deployctl").to_str().unwrap());
    for a in args {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a));
    }
    let out = deployctl_e2e::run(
        Path::new("/usr/bin/script"),
        s.env.root(),
        &["-qec", &cmd, "/dev/null"],
        env,
    );
    Some(out)
}

/// Quotes a word for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Removes CSI escape sequences (`ESC [ ... final`).
fn strip_csi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// SGR (colour) sequences: `ESC [ <digits;> m`.
fn has_sgr(raw: &str) -> bool {
    raw.match_indices("\x1b[").any(|(i, _)| {
        raw[i + 2..]
            .chars()
            .find(|c| !(c.is_ascii_digit() || *c == ';'))
            == Some('m')
    })
}

#[track_caller]
fn assert_terminal_lines(out: &Output) {
    // Messages (not bars): each must be alone on its line, end with the line's newline,
    // and carry no padding. indicatif's println used to pad each one with spaces to the
    // terminal's width and end none of them, so the whole run was one line.
    // (Bars and the spinner start differently: "[local] upload =>", "[local] ⠁ ...".)
    let markers = ["[local] connected", "[local] uploaded ", "[local] release "];
    let mut seen = 0;
    let text = strip_csi(&out.stdout);
    for line in text.split('\n') {
        let segments: Vec<&str> = line.trim_end_matches('\r').split('\r').collect();
        for (i, seg) in segments.iter().enumerate() {
            if !markers.iter().any(|m| seg.starts_with(m)) {
                continue;
            }
            seen += 1;
            assert!(
                i + 1 == segments.len(),
                "the message is overwritten before its newline: {seg:?}\n{out:?}"
            );
            assert!(
                !seg.contains("  ") && !seg.ends_with(' '),
                "a message padded with spaces (or sharing its line): {seg:?}\n{out:?}"
            );
        }
    }
    assert!(
        seen >= 3,
        "the progress messages are on the terminal: {out:?}"
    );
}

// See: #18
// On a terminal: lines end with newlines (not padded to the width), the upload draws a
// bar, and NO_COLOR turns colours off (cursor movement from the bars stays).
#[test]
fn on_a_terminal_progress_is_lines_and_bars_and_no_color_means_none() {
    let s = Site::local();
    s.write_config("", "");
    let v1 = artifact(&s, "v1", 24 << 20);
    let args = [
        "push",
        "test",
        "--artifact",
        v1.to_str().unwrap(),
        "--version",
        "v1",
    ];
    let Some(out) = under_pty(&s, &args, &[("NO_COLOR", "1")]) else {
        return;
    };
    out.assert_exit(0);
    assert_terminal_lines(&out);
    assert!(
        out.stdout.contains("[local] upload ") && out.stdout.contains("eta"),
        "an upload bar was drawn: {out:?}"
    );
    assert!(
        !has_sgr(&out.stdout),
        "no colour codes with NO_COLOR: {out:?}"
    );

    // Without NO_COLOR: colours on the terminal; the delta upload draws its own bar.
    let v2 = artifact(&s, "v2", 24 << 20);
    let args = [
        "push",
        "test",
        "--artifact",
        v2.to_str().unwrap(),
        "--version",
        "v2",
    ];
    let out = under_pty(&s, &args, &[]).unwrap();
    out.assert_exit(0);
    assert_terminal_lines(&out);
    assert!(has_sgr(&out.stdout), "colours on a terminal: {out:?}");
    assert!(
        strip_csi(&out.stdout).contains("[local] delta "),
        "a delta bar was drawn: {out:?}"
    );
    // A pipe gets no escape codes at all, colours or bars.
    let v3 = artifact(&s, "v3", 1 << 20);
    let out = s.run(&[
        "push",
        "test",
        "--artifact",
        v3.to_str().unwrap(),
        "--version",
        "v3",
    ]);
    out.assert_exit(0);
    assert!(!out.stderr.contains('\x1b'), "{out}");
}

// See: #18
// A delta upload reads the whole artifact twice (its manifest, then to pick out the few
// files the host lacks); that used to be silent (5 s for 300 MB). Off a terminal it prints a progress line every
// DEPLOYCTL_PROGRESS_EVERY (default 1s; 20ms here so a quick machine shows some).
#[test]
fn a_delta_upload_prints_progress_lines() {
    let s = Site::local();
    s.write_config("", "");
    let v1 = artifact(&s, "v1", 48 << 20);
    let v2 = artifact(&s, "v2", 48 << 20);
    s.run(&[
        "push",
        "test",
        "--artifact",
        v1.to_str().unwrap(),
        "--version",
        "v1",
    ])
    .assert_exit(0);
    let out = s.run_env(
        &[
            "push",
            "test",
            "--artifact",
            v2.to_str().unwrap(),
            "--version",
            "v2",
        ],
        &[("DEPLOYCTL_PROGRESS_EVERY", "20ms")],
    );
    out.assert_exit(0);
    assert!(out.stderr.contains("delta: sending 1 of 22 files"), "{out}");
    let progress: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| {
            l.starts_with("delta: reading the artifact for its manifest: ")
                || (l.starts_with("[local] delta: ")
                    && l.contains(" files, ")
                    && l.contains(" read ("))
        })
        .collect();
    assert!(
        !progress.is_empty(),
        "progress while the delta is picked out: {out}"
    );
    assert!(!out.stderr.contains('\x1b'), "plain lines on a pipe: {out}");
}
