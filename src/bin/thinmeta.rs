//! The multi-call binary: `thinmeta thin_dump ...`, or `thin_dump ...` through a symlink.

fn main() {
    // A panic is a bug; still, never let it look like success or like exit 2.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("thinmeta: internal error (please report): {info}");
        std::process::exit(thinmeta::cli::EXIT_INTERNAL);
    }));
    // Writing to a closed pipe (`thin_dump | head`) should end quietly.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let code = thinmeta::cli::dispatch(std::env::args_os().collect());
    std::process::exit(code);
}
