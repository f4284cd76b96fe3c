//! thin_message: the thin-pool target's messages, applied offline to an
//! inactive metadata device, or sent to a live pool (`--pool`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

use super::*;
use crate::thin::message::{apply, Message, MessageError};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Apply a thin-pool message (create_thin, create_snap, delete, set_transaction_id, reserve_metadata_snap, release_metadata_snap) to inactive metadata, or send it to a live pool.")
        .disable_version_flag(true)
        .arg(
            Arg::new("pool")
                .long("pool")
                .value_name("DMNAME")
                .help("Send the message to this live thin-pool device (device-mapper name) instead"),
        )
        .arg(quiet_arg())
        .arg(version_arg())
        .arg(
            Arg::new("ARGS")
                .help("METADATA MESSAGE... (offline), or MESSAGE... with --pool")
                .num_args(1..)
                .trailing_var_arg(true)
                .allow_hyphen_values(true)
                .action(ArgAction::Append),
        )
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let quiet = m.get_flag("quiet");
    let mut words: Vec<String> = m
        .get_many::<String>("ARGS")
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if let Some(pool) = m.get_one::<String>("pool") {
        // Check the message here too: the kernel's errors are terse.
        Message::parse(&words).map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))?;
        let text = words.join(" ");
        let reply = crate::dm::target_message(pool, &text).map_err(|e| {
            // The kernel's refusals (an id in use, a missing device, a second
            // metadata snapshot, a wrong old transaction id) are usage errors
            // as offline; a missing pool is a missing device.
            let code = match &e {
                crate::dm::DmError::Message { source, .. }
                    if source.raw_os_error() == Some(libc::ENXIO) =>
                {
                    EXIT_NO_INPUT
                }
                crate::dm::DmError::Message { source, .. }
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::EEXIST | libc::ENODATA | libc::EINVAL | libc::EBUSY)
                    ) =>
                {
                    EXIT_USAGE
                }
                crate::dm::DmError::NameTooLong(_) => EXIT_USAGE,
                crate::dm::DmError::Control(_) => EXIT_NO_INPUT,
                _ => EXIT_IO,
            };
            Failure::new(code, e.to_string())
        })?;
        if let (Some(r), false) = (reply, quiet) {
            println!("{r}");
        }
        return Ok(());
    }
    if words.is_empty() {
        return Err(Failure::new(
            EXIT_USAGE,
            "give the metadata device and a message (or --pool DMNAME and a message)",
        ));
    }
    let meta = PathBuf::from(words.remove(0));
    let msg = Message::parse(&words).map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))?;
    let dev = open_device(&meta, OpenMode::ReadWriteExclusive)?;
    apply(&dev, msg).map_err(|e| match e {
        MessageError::Usage(s) => Failure::new(EXIT_USAGE, s),
        MessageError::Refused(s) => Failure::new(
            EXIT_USAGE,
            format!("{}: {s}; nothing was written", meta.display()),
        ),
        e @ (MessageError::NeedsCheck | MessageError::Unsound(_)) => Failure::new(
            EXIT_DAMAGED,
            format!("{}: {e}; nothing was written", meta.display()),
        ),
        MessageError::Metadata(e) => Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_DAMAGED },
            format!("{}: {e}; nothing was written", meta.display()),
        ),
    })?;
    Ok(())
}
