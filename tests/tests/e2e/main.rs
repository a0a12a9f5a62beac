//! End-to-end tests: the real `deployctl` and `deploy-agent` binaries, a real OpenSSH
//! sshd on loopback with throwaway keys. One test binary; one module per area.

mod agent;
mod bootstrap;
mod check;
mod cli_ux;
mod compose;
mod cutover;
mod cutover_compose;
mod cutover_slots;
mod dayops;
mod delta;
mod docs;
mod fleet;
mod github;
mod hardening_agent;
mod hardening_controller;
mod hardening_input;
mod hooks;
mod jump;
mod layers;
mod plan;
mod promote;
mod release;
mod review_apps;
mod support;
mod ux_messages;
mod ux_more;
mod vm;
mod watch;
