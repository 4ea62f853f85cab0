//! The integration tests: one binary (`cargo test --test it`).

mod support;

mod agent_protocol;
mod blips;
mod bridge_fake;
mod cluster;
mod controls_fake;
mod controls_real;
mod daemon_binary;
mod dev_up;
mod e2e_interactive;
mod e2e_real_opencode;
mod examples;
mod faults_load;
mod first_hour;
mod hostile;
mod isolation;
mod jobs;
mod nats_cluster;
mod nats_harness;
mod opencode_versions;
mod ops_cli;
mod ops_nats_permissions;
mod ops_service;
mod ops_systemd;
mod real_opencode_smoke;
mod record_fixtures;
mod replicas;
mod sandbox_exec;
mod sandbox_mode;
mod sandbox_opencode;
mod sandbox_tenants;
mod trust;
mod turn_status;
