//! Reading a JSON log as a reader proves it whole: every file (rotated ones oldest first) holds
//! only whole lines, each a JSON object, and the events' sequence numbers (`seq`) say what is
//! missing or repeated.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// `PATH.n`, as the agent names rotated files.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The files of a log, oldest first: `PATH.N` ... `PATH.1` (those that exist), then `PATH`.
pub fn log_files(path: &Path, max_rotated: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=max_rotated)
        .rev()
        .map(|n| numbered(path, n))
        .filter(|p| p.exists())
        .collect();
    files.push(path.to_owned());
    files
}

/// The events of `bytes`, which must be whole lines (ending in a newline), each a JSON object.
pub fn whole_lines(bytes: &[u8], name: &str) -> anyhow::Result<Vec<Value>> {
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        let tail = &bytes[bytes.len().saturating_sub(120)..];
        bail!(
            "{name} ends in a partial line: ...{:?}",
            String::from_utf8_lossy(tail)
        );
    }
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, line)| {
            let value: Value = serde_json::from_slice(line).with_context(|| {
                format!(
                    "{name} line {} is not JSON: {:?}",
                    i + 1,
                    String::from_utf8_lossy(line)
                )
            })?;
            if !value.is_object() {
                bail!("{name} line {} is not a JSON object", i + 1);
            }
            Ok(value)
        })
        .collect()
}

/// Every event of the log's files, in order.
pub fn read_log(files: &[PathBuf]) -> anyhow::Result<Vec<Value>> {
    let mut events = Vec::new();
    for file in files {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        events.extend(whole_lines(&bytes, &file.display().to_string())?);
    }
    Ok(events)
}

/// What the sequence numbers of a log say, against the agent's count of events delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqAccount {
    pub lines: u64,
    /// Sequence numbers below `delivered` that no line has.
    pub missing: u64,
    /// Lines whose number another line has already.
    pub repeated: u64,
    /// Lines whose number is not above the line before's.
    pub out_of_order: u64,
    /// Lines numbered `delivered` or more.
    pub beyond: u64,
}

/// Accounts for `0..delivered` in the `seq` of `events` (in log order).
pub fn account(events: &[Value], delivered: u64) -> anyhow::Result<SeqAccount> {
    let mut seen = vec![false; delivered as usize];
    let mut account = SeqAccount::default();
    let mut previous: Option<u64> = None;
    for event in events {
        let seq = event["seq"]
            .as_u64()
            .with_context(|| format!("an event has no seq: {event}"))?;
        account.lines += 1;
        if previous.is_some_and(|p| seq <= p) {
            account.out_of_order += 1;
        }
        previous = Some(seq);
        match seen.get_mut(seq as usize) {
            Some(true) => account.repeated += 1,
            Some(slot) => *slot = true,
            None => account.beyond += 1,
        }
    }
    account.missing = seen.iter().filter(|s| !**s).count() as u64;
    Ok(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting() {
        let events: Vec<Value> = [0, 1, 3, 3, 2, 9]
            .iter()
            .map(|s| serde_json::json!({ "seq": s }))
            .collect();
        let a = account(&events, 6).unwrap();
        assert_eq!(
            a,
            SeqAccount {
                lines: 6,
                missing: 2,
                repeated: 1,
                out_of_order: 2,
                beyond: 1
            }
        );
        assert!(whole_lines(b"{}\n{\"a\"", "x").is_err());
        assert_eq!(whole_lines(b"{}\n{}\n", "x").unwrap().len(), 2);
        assert!(whole_lines(b"{}\n[1]\n", "x").is_err());
    }
}
