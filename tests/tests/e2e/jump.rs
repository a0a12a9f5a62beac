//! Jump hosts (`proxy_jump`, `ProxyJump`) and the OpenSSH client config, end to end.
//!
//! Every "host" is a real sshd. The target listens on the loopback of a network namespace
//! the test makes, so only a jump host inside that namespace can reach it; the first jump
//! host listens on a veth address reachable from here. With two hops, the second jump
//! host sits in a second namespace reachable only from the first one's:
//!
//! ```text
//! deployctl --veth--> jump1 (ns 1) --veth--> jump2 (ns 2) --lo--> target (ns 2)
//! ```
//!
//! The agent runs here; the target's sshd reaches its socket through the file system
//! (a Unix socket path is not tied to a network namespace).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;

use deployctl_e2e::require::{missing, require};
use deployctl_e2e::{Agent, Output, Sshd, SshdOptions, TestEnv, bin, deployctl};

/// A network namespace named `sshcfg-<pid>-<tag>`, deleted on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("sshcfg-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A `wrap` that starts sshd inside this namespace.
    fn wrap(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.name)]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Addresses of the /30 between `a` (None: this namespace) and `b`, distinct per test
/// process: `198.18+idx.X.Y` (the benchmarking range, unused on real networks).
fn link(a: Option<&Netns>, b: &Netns, idx: u32) -> (String, String) {
    let pid = std::process::id();
    let net = format!("198.{}.{}.{}", 18 + idx, (pid / 64) % 256, (pid % 64) * 4);
    let base = net.rsplit_once('.').unwrap().0.to_owned();
    let last: u32 = net.rsplit_once('.').unwrap().1.parse().unwrap();
    let (ip_a, ip_b) = (
        format!("{base}.{}", last + 1),
        format!("{base}.{}", last + 2),
    );
    let (va, vb) = (format!("sc{pid}{idx}a"), format!("sc{pid}{idx}b"));
    // A link left by a killed run of a process with the same pid (no Drop ran).
    let _ = Command::new("ip").args(["link", "del", &va]).output();
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &vb, "netns", &b.name]);
    ip(&[
        "-n",
        &b.name,
        "addr",
        "add",
        &format!("{ip_b}/30"),
        "dev",
        &vb,
    ]);
    ip(&["-n", &b.name, "link", "set", &vb, "up"]);
    match a {
        Some(a) => {
            ip(&["link", "set", &va, "netns", &a.name]);
            ip(&[
                "-n",
                &a.name,
                "addr",
                "add",
                &format!("{ip_a}/30"),
                "dev",
                &va,
            ]);
            ip(&["-n", &a.name, "link", "set", &va, "up"]);
        }
        None => {
            ip(&["addr", "add", &format!("{ip_a}/30"), "dev", &va]);
            ip(&["link", "set", &va, "up"]);
        }
    }
    (ip_a, ip_b)
}

fn can_run() -> bool {
    if !require(
        "nsenter",
        "enters the test's network namespaces (util-linux)",
    ) {
        return false;
    }
    let ip_ok = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ip_ok && !missing("`ip`", "makes network namespaces and veth links (iproute2)") {
        return false;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    root || missing("root", "network namespaces and veth links need root")
}

/// One sshd with where it listens, as deploy.toml and known_hosts name it.
struct Node {
    sshd: Sshd,
    addr: String,
}

impl Node {
    fn start(ns: &Netns, listen: &str, reachable: bool, extra: Vec<String>) -> Node {
        let sshd = Sshd::start(SshdOptions {
            wrap: ns.wrap(),
            listen: Some(listen.to_owned()),
            reachable,
            extra_config: extra,
            ..Default::default()
        });
        Node {
            sshd,
            addr: listen.to_owned(),
        }
    }

    fn known_hosts_line(&self) -> String {
        format!(
            "[{}]:{} {}",
            self.addr, self.sshd.port, self.sshd.host_key_pub
        )
    }

    /// `root@198.18.x.y:2222`
    fn spec(&self) -> String {
        format!("{}@{}:{}", self.sshd.user, self.addr, self.sshd.port)
    }
}

/// The namespaces, the jump hosts, the target and its agent.
struct Net {
    env: TestEnv,
    agent: Agent,
    target: Node,
    jumps: Vec<Node>,
    // Dropped last: the sshds above run inside them.
    _ns: Vec<Netns>,
}

impl Net {
    /// `hops` jump hosts (1 or 2) in front of the target. With `shared_key`, every jump
    /// host also accepts the target's client key (one `ssh_key` for all hops); without,
    /// each has its own.
    fn start(hops: usize, shared_key: bool) -> Net {
        Net::start_with(hops, shared_key, &[])
    }

    /// Like [`Net::start`], with `jump_extra` in every jump host's sshd_config.
    fn start_with(hops: usize, shared_key: bool, jump_extra: &[&str]) -> Net {
        let env = TestEnv::new();
        let agent = Agent::start(&env.path("agent"));
        let ns1 = Netns::new("1");
        let (_, jump1_addr) = link(None, &ns1, 0);
        let mut ns = vec![ns1];
        let mut jump_addrs = vec![jump1_addr];
        if hops == 2 {
            let ns2 = Netns::new("2");
            let (_, jump2_addr) = link(Some(&ns[0]), &ns2, 1);
            ns.push(ns2);
            jump_addrs.push(jump2_addr);
        }
        let last = ns.last().unwrap();
        let target = Node::start(last, "127.0.0.1", false, Vec::new());
        let extra = || {
            let mut lines: Vec<String> = jump_extra.iter().map(|l| l.to_string()).collect();
            if shared_key {
                lines.push(format!(
                    "AuthorizedKeysFile {}",
                    target.sshd.dir.join("authorized_keys").display()
                ));
            }
            lines
        };
        let mut jumps = Vec::new();
        for (i, addr) in jump_addrs.iter().enumerate() {
            jumps.push(Node::start(&ns[i], addr, i == 0, extra()));
        }
        // The target is not reachable from here: only through the jump hosts.
        assert!(
            TcpStream::connect(("127.0.0.1", target.sshd.port)).is_err(),
            "the target's port answers outside its namespace"
        );
        Net {
            env,
            agent,
            target,
            jumps,
            _ns: ns,
        }
    }

    fn known_hosts(&self, with_jumps: bool) -> String {
        let mut s = format!("{}\n", self.target.known_hosts_line());
        if with_jumps {
            for j in &self.jumps {
                s.push_str(&format!("{}\n", j.known_hosts_line()));
            }
        }
        s
    }

    /// deploy.toml with environment `prod` on `host`; `extra` goes into it.
    fn config(&self, host: &str, extra: &str) {
        let text = format!(
            r#"app = "app"
deploy_to = "{deploy_to}"

[environments.prod]
hosts = ["{host}"]
agent_socket = "{socket}"
agent_bin = "{agent_bin}"
connect_timeout = "5s"
connect_retries = 1
{extra}
"#,
            deploy_to = self.agent.root.join("app").display(),
            socket = self.agent.socket.display(),
            agent_bin = bin("deploy-agent").display(),
        );
        self.env.write("deploy.toml", text);
    }

    fn artifact(&self, version: &str) -> PathBuf {
        let path = self.env.path(&format!("{version}.tar.gz"));
        let f = std::fs::File::create(&path).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let body = format!("{version}\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "VERSION", body.as_bytes()).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        path
    }

    fn push(&self, version: &str, env: &[(&str, &str)]) -> Output {
        let art = self.artifact(version);
        deployctl(
            self.env.root(),
            &[
                "push",
                "prod",
                "--artifact",
                art.to_str().unwrap(),
                "--version",
                version,
                "--yes",
            ],
            env,
        )
    }

    fn live_version(&self) -> Option<String> {
        std::fs::read_to_string(self.agent.root.join("app/current/VERSION"))
            .ok()
            .map(|v| v.trim().to_owned())
    }
}

#[test]
fn a_deploy_through_one_jump_host_from_proxy_jump() {
    if !can_run() {
        return;
    }
    let net = Net::start(1, true);
    net.env.write("known_hosts", net.known_hosts(true));
    net.config(
        &net.target.spec(),
        &format!(
            "proxy_jump = \"{}\"\nssh_key = \"{}\"\nknown_hosts = \"{}\"\nssh_config = false",
            net.jumps[0].spec(),
            net.target.sshd.client_key.display(),
            net.env.path("known_hosts").display(),
        ),
    );
    let out = net.push("v1", &[]);
    out.assert_success();
    assert_eq!(net.live_version().as_deref(), Some("v1"));
    // The jump host's sshd really carried the connection.
    let log = net.jumps[0].sshd.log();
    assert!(log.contains("Accepted publickey"), "{log}");
}

#[test]
fn a_two_hop_deploy_from_the_ssh_config_with_a_host_alias() {
    if !can_run() {
        return;
    }
    // Each sshd accepts only its own key: IdentityFile must be applied per hop.
    let net = Net::start(2, false);
    let home = net.env.mkdir("home");
    net.env
        .write("home/.ssh/known_hosts_e2e", net.known_hosts(true));
    let (j1, j2, t) = (&net.jumps[0], &net.jumps[1], &net.target);
    net.env.write(
        "home/.ssh/config",
        "# the operator's config\nInclude conf.d/*\n\
         Host *\n  UserKnownHostsFile ~/.ssh/known_hosts_e2e\n  ServerAliveInterval 10\n",
    );
    net.env.write(
        "home/.ssh/conf.d/app",
        format!(
            "Host app\n  HostName {}\n  Port {}\n  User {}\n  IdentityFile {}\n  ProxyJump bastion,inner\n\
             Host bastion\n  HostName {}\n  Port {}\n  User {}\n  IdentityFile {}\n\
             Host inner\n  HostName {}\n  Port {}\n  User {}\n  IdentityFile {}\n",
            t.addr,
            t.sshd.port,
            t.sshd.user,
            t.sshd.client_key.display(),
            j1.addr,
            j1.sshd.port,
            j1.sshd.user,
            j1.sshd.client_key.display(),
            j2.addr,
            j2.sshd.port,
            j2.sshd.user,
            j2.sshd.client_key.display(),
        ),
    );
    // No user, key or known_hosts in deploy.toml: the ssh config supplies them, and the
    // default user ($USER) would be wrong.
    net.config("app", "");
    let env = [("HOME", home.to_str().unwrap()), ("USER", "nobody-here")];
    let out = net.push("v1", &env);
    out.assert_success();
    assert_eq!(net.live_version().as_deref(), Some("v1"));
    for j in &net.jumps {
        let log = j.sshd.log();
        assert!(log.contains("Accepted publickey"), "{log}");
    }
    // `status` goes the same way.
    deployctl(net.env.root(), &["status", "prod"], &env).assert_success();
}

#[test]
fn a_two_hop_deploy_from_proxy_jump_with_an_ssh_config_path() {
    if !can_run() {
        return;
    }
    let net = Net::start(2, true);
    net.env.write("known_hosts", net.known_hosts(true));
    let t = &net.target;
    // The alias comes from ssh_config = PATH; the hops from deploy.toml, which wins over
    // the config's ProxyJump (pointing nowhere useful here).
    net.env.write(
        "ssh/cfg",
        format!(
            "Host app\n  HostName {}\n  Port {}\n  ProxyJump 192.0.2.250:1\n",
            t.addr, t.sshd.port
        ),
    );
    net.config(
        "app",
        &format!(
            "user = \"{}\"\nproxy_jump = \"{},{}\"\nssh_key = \"{}\"\nknown_hosts = \"{}\"\n\
             ssh_config = \"{}\"",
            t.sshd.user,
            net.jumps[0].spec(),
            net.jumps[1].spec(),
            t.sshd.client_key.display(),
            net.env.path("known_hosts").display(),
            net.env.path("ssh/cfg").display(),
        ),
    );
    net.push("v1", &[]).assert_success();
    net.push("v2", &[]).assert_success();
    assert_eq!(net.live_version().as_deref(), Some("v2"));
}

#[test]
fn an_unknown_jump_host_key_is_exit_3_naming_the_jump_host() {
    if !can_run() {
        return;
    }
    let net = Net::start(1, true);
    // Only the target is known; the jump host is not.
    net.env.write("known_hosts", net.known_hosts(false));
    let j = &net.jumps[0];
    net.config(
        &net.target.spec(),
        &format!(
            "proxy_jump = \"{}\"\nssh_key = \"{}\"\nknown_hosts = \"{}\"\nssh_config = false",
            j.spec(),
            net.target.sshd.client_key.display(),
            net.env.path("known_hosts").display(),
        ),
    );
    let out = net.push("v1", &[]);
    out.assert_exit(3);
    let want = format!("via jump host {}: host key is not known", j.spec());
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("ssh-keyscan -p {} {}", j.sshd.port, j.addr)),
        "{}",
        out.stderr
    );
    assert_eq!(net.live_version(), None, "nothing was deployed");
    // A changed key on the jump host is refused too.
    let other = j.sshd.other_host_key_pub();
    net.env.write(
        "known_hosts",
        format!(
            "{}[{}]:{} {other}\n",
            net.known_hosts(false),
            j.addr,
            j.sshd.port
        ),
    );
    let out = net.push("v1", &[]);
    out.assert_exit(3);
    assert!(out.stderr.contains("HOST KEY CHANGED"), "{}", out.stderr);
    assert!(out.stderr.contains("via jump host"), "{}", out.stderr);
}

#[test]
fn a_jump_host_that_forbids_forwarding_is_exit_3_saying_so() {
    if !can_run() {
        return;
    }
    let net = Net::start_with(1, true, &["AllowTcpForwarding no"]);
    net.env.write("known_hosts", net.known_hosts(true));
    let j = &net.jumps[0];
    net.config(
        &net.target.spec(),
        &format!(
            "proxy_jump = \"{}\"\nssh_key = \"{}\"\nknown_hosts = \"{}\"\nssh_config = false",
            j.spec(),
            net.target.sshd.client_key.display(),
            net.env.path("known_hosts").display(),
        ),
    );
    let out = net.push("v1", &[]);
    out.assert_exit(3);
    let want = format!(
        "the jump host {} could not open a connection to 127.0.0.1:{}",
        j.spec(),
        net.target.sshd.port
    );
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    assert_eq!(net.live_version(), None);
}

#[test]
fn an_unparseable_ssh_config_is_exit_2_naming_file_and_line() {
    // No network needed: nothing is contacted.
    let env = TestEnv::new();
    let cfg = env.write(
        "my_ssh_config",
        "Host app\n  HostName 10.0.0.1\n  Port ssh-port\n",
    );
    let deploy = |extra: &str| {
        env.write(
            "deploy.toml",
            format!(
                "app = \"app\"\ndeploy_to = \"/srv/app\"\n[environments.prod]\n\
                 hosts = [\"app\"]\nknown_hosts = \"{}\"\n{extra}\n",
                env.path("known_hosts").display()
            ),
        );
    };
    deploy(&format!("ssh_config = \"{}\"", cfg.display()));
    let out = deployctl(env.root(), &["check", "prod"], &[]);
    out.assert_exit(2);
    let want = format!("{}:3: bad Port `ssh-port`", cfg.display());
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    // ProxyCommand cannot be honoured: refused, naming its line, rather than ignored.
    std::fs::write(&cfg, "Host *\n  ProxyCommand ssh -W %h:%p bastion\n").unwrap();
    let out = deployctl(env.root(), &["status", "prod"], &[]);
    out.assert_exit(2);
    let want = format!("{}:2: ProxyCommand is not supported", cfg.display());
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    // A missing ssh_config file named in deploy.toml is an error too.
    deploy(&format!("ssh_config = \"{}\"", env.path("nope").display()));
    let out = deployctl(env.root(), &["check", "prod"], &[]);
    out.assert_exit(2);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
    // A bad proxy_jump is a config error naming deploy.toml's line.
    deploy("proxy_jump = \"bastion:99999\"");
    let out = deployctl(env.root(), &["check", "prod"], &[]);
    out.assert_exit(2);
    assert!(out.stderr.contains("deploy.toml:6"), "{}", out.stderr);
    assert!(out.stderr.contains("bad port `99999`"), "{}", out.stderr);
}
