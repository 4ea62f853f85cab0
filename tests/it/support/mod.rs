//! Test support shared by the integration tests of this binary.
#![allow(dead_code)]

pub mod bridge;
pub mod cluster;
pub mod control;
pub mod daemon;
pub mod fake_llm;
pub mod fake_opencode;
pub mod http;
pub mod leaks;
pub mod nats;
pub mod ops;
pub mod proxy;
pub mod real_opencode;
pub mod rig;
pub mod tenant_user;
