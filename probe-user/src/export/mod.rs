//! Where events and statistics leave the agent.
pub mod http;
pub mod json_log;
pub mod prometheus;
pub mod view;
pub mod web_config;
