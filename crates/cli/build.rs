//! Link settings of the `sandfleet` binary.
//!
//! On Linux with glibc, relative relocations are packed (`DT_RELR`). The
//! binary is position-independent, so the loader rewrites every pointer in its
//! read-only data at start-up; as `RELA` entries (24 bytes each) the ~49,000
//! of them are 1.1 MiB that the loader reads once and that then stay mapped in
//! every worker for its whole life. Packed, they are a few KiB. The loader
//! needs glibc 2.36 (Debian 12, the images in `deploy/Dockerfile`); the linker
//! needs binutils 2.38 or lld 15, and the flag is left out, with a
//! warning, when the linker does not know it.

use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CC");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || env != "gnu" {
        return;
    }
    if linker_knows_relr() {
        println!("cargo::rustc-link-arg-bins={FLAG}");
    } else {
        println!(
            "cargo::warning=the linker does not support `-z pack-relative-relocs`; \
             the sandfleet binary keeps its relocations unpacked (about 1 MiB more \
             resident per process)"
        );
    }
}

/// Whether the linker driver rustc links with passes the flag to a linker
/// that knows it (GNU ld's and lld's `--help` list it): the target's
/// configured linker (cargo hands it over as `RUSTC_LINKER`), else `$CC`,
/// else `cc`.
fn linker_knows_relr() -> bool {
    let driver = std::env::var("RUSTC_LINKER")
        .or_else(|_| std::env::var("CC"))
        .unwrap_or_else(|_| "cc".to_owned());
    Command::new(driver)
        .arg("-Wl,--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("pack-relative-relocs"))
}
