//! Where events and statistics leave the agent.
pub mod json_log;
