//! A test "site": one sshd, one agent, and a deploy.toml pointing at them.

use std::path::PathBuf;

use deployctl_e2e::{Agent, Output, Sshd, SshdOptions, TestEnv, bin, deployctl};

pub struct Site {
    pub env: TestEnv,
    pub sshd: Option<Sshd>,
    pub agent: Agent,
    /// `<agent root>/app`
    pub deploy_to: PathBuf,
}

impl Site {
    /// An sshd (with the given options) and an agent; known_hosts trusts the sshd.
    pub fn ssh(opts: SshdOptions) -> Site {
        let env = TestEnv::new();
        let sshd = Sshd::start(opts);
        sshd.write_known_hosts(&env.path("known_hosts"));
        let agent = Agent::start(&env.path("agent"));
        let deploy_to = agent.root.join("app");
        Site {
            env,
            sshd: Some(sshd),
            agent,
            deploy_to,
        }
    }

    /// Like [`Site::ssh`] with extra environment variables for the agent.
    pub fn ssh_with_agent_env(opts: SshdOptions, agent_env: &[(&str, &str)]) -> Site {
        let env = TestEnv::new();
        let sshd = Sshd::start(opts);
        sshd.write_known_hosts(&env.path("known_hosts"));
        let agent = Agent::start_env(&env.path("agent"), agent_env);
        let deploy_to = agent.root.join("app");
        Site {
            env,
            sshd: Some(sshd),
            agent,
            deploy_to,
        }
    }

    /// Only an agent, for `hosts = ["local"]`.
    pub fn local() -> Site {
        let env = TestEnv::new();
        let agent = Agent::start(&env.path("agent"));
        let deploy_to = agent.root.join("app");
        Site {
            env,
            sshd: None,
            agent,
            deploy_to,
        }
    }

    pub fn sshd(&self) -> &Sshd {
        self.sshd.as_ref().expect("this site has no sshd")
    }

    /// The host string for deploy.toml.
    pub fn host(&self) -> String {
        match &self.sshd {
            Some(s) => format!("{}@127.0.0.1:{}", s.user, s.port),
            None => "local".into(),
        }
    }

    /// Writes deploy.toml with one environment `test`; `extra` goes into `[defaults]`,
    /// and `tail` after everything (for tables like `[defaults.health]`).
    pub fn write_config(&self, extra: &str, tail: &str) {
        let key = self
            .sshd
            .as_ref()
            .map(|s| format!("ssh_key = \"{}\"\n", s.client_key.display()))
            .unwrap_or_default();
        let text = format!(
            r#"app = "app"
deploy_to = "{deploy_to}"

[defaults]
{key}known_hosts = "{known_hosts}"
agent_socket = "{socket}"
agent_bin = "{agent_bin}"
connect_timeout = "5s"
connect_retries = 1
{extra}

[environments.test]
hosts = ["{host}"]

{tail}
"#,
            deploy_to = self.deploy_to.display(),
            known_hosts = self.env.path("known_hosts").display(),
            socket = self.agent.socket.display(),
            agent_bin = bin("deploy-agent").display(),
            host = self.host(),
        );
        self.env.write("deploy.toml", text);
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        deployctl(self.env.root(), args, env)
    }
}
