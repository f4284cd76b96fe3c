//! thin_metadata_pack / thin_metadata_unpack: round trips on images we make,
//! a pack written by hand with a known layout, refusal of damaged packs, and
//! compatibility with the original tool (its packs, and its unpacker on
//! ours) where its test data and binary are present.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use sha2::{Digest, Sha256};
use thinmeta::pdata::checksum::{seal, BlockKind};

fn sha(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn ok(tool: &str, args: &[&str]) -> Output {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// kernel-small's metadata image, gunzipped into `dir`.
fn kernel_small(dir: &Path) -> PathBuf {
    unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.bin")
}

/// The compressed chunk lengths of a pack (walking its framing only).
fn chunk_lengths(pack: &[u8]) -> Vec<u64> {
    let mut off = 32;
    let mut v = Vec::new();
    while off < pack.len() {
        let n = u64::from_le_bytes(pack[off..off + 8].try_into().unwrap());
        v.push(n);
        off += 8 + n as usize;
    }
    assert_eq!(off, pack.len(), "chunks end at the end of the file");
    v
}

fn pack_and_unpack(dir: &Path, img: &Path) -> (PathBuf, PathBuf) {
    let pack = dir.join("img.pack");
    let back = dir.join("back.bin");
    ok("thin_metadata_pack", &["-i", s(img), "-o", s(&pack)]);
    ok("thin_metadata_unpack", &["-i", s(&pack), "-o", s(&back)]);
    (pack, back)
}

#[test]
fn kernel_small_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = kernel_small(dir.path());
    let (pack, back) = pack_and_unpack(dir.path(), &img);
    assert_eq!(sha(&back), sha(&img));
    let bytes = std::fs::read(&pack).unwrap();
    assert!(
        bytes.len() < 4096,
        "58 metadata blocks pack small: {}",
        bytes.len()
    );
    // Deterministic, and the same as the committed fixture (a change of the
    // encoder must be checked against the original unpacker again).
    assert_eq!(
        bytes,
        std::fs::read(repo().join("tests/data/pack/kernel-small.pack")).unwrap()
    );
    // A gzip-compressed image packs the same.
    let gz_pack = dir.path().join("gz.pack");
    ok(
        "thin_metadata_pack",
        &[
            "-i",
            s(&fixture_dir().join("meta.img.gz")),
            "-o",
            s(&gz_pack),
        ],
    );
    assert_eq!(std::fs::read(&gz_pack).unwrap(), bytes);
}

#[test]
fn committed_fixture_unpacks_to_kernel_small() {
    let dir = tempfile::tempdir().unwrap();
    let img = kernel_small(dir.path());
    let out = dir.path().join("out.bin");
    ok(
        "thin_metadata_unpack",
        &[
            "-i",
            s(&repo().join("tests/data/pack/kernel-small.pack")),
            "-o",
            s(&out),
        ],
    );
    assert_eq!(sha(&out), sha(&img));
    assert_eq!(
        sha(&out),
        "33ea04b4bdff7cc07048ee4533498fe993122f1ce82cbd900e648fb0ae8ff9d8"
    );
    // The unpacked metadata reads as the original does.
    let a = ok("thin_dump", &[s(&img)]);
    let b = ok("thin_dump", &[s(&out)]);
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn generated_pool_round_trip_spans_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gen.bin");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    ok(
        "thin_generate_metadata",
        &[
            "-q",
            "-o",
            s(&img),
            "--origins",
            "2",
            "--snaps",
            "2",
            "--segments",
            "300",
            "--writes",
            "200",
            "--metadata-snap",
        ],
    );
    let (pack, back) = pack_and_unpack(dir.path(), &img);
    assert_eq!(sha(&back), sha(&img));
    let bytes = std::fs::read(&pack).unwrap();
    let chunks = chunk_lengths(&bytes);
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    assert!(
        bytes.len() < (64 << 20) / 50,
        "pack of {} bytes",
        bytes.len()
    );
    assert_eq!(
        u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
        16384,
        "the header keeps the image's size"
    );
}

/// A pack assembled here, instruction by instruction.
fn hand_pack(nr_blocks: u64, entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut raw = Vec::new();
    for (ix, stream) in entries {
        raw.extend_from_slice(&ix.to_le_bytes());
        raw.extend_from_slice(stream);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).unwrap();
    let z = z.finish().unwrap();
    let mut p = Vec::new();
    for v in [0xa537_a0aa_6309_ef77u64, 3, 4096, nr_blocks, z.len() as u64] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&z);
    p
}

/// A leaf of a mapping tree at block `at`: keys 5 and 6 mapping to data
/// blocks 7 and 8 at times 3 and 4; and the instructions that rebuild it.
fn leaf_and_stream(at: u64) -> (Vec<u8>, Vec<u8>) {
    let mut b = vec![0u8; 4096];
    b[4..8].copy_from_slice(&2u32.to_le_bytes()); // leaf
    b[8..16].copy_from_slice(&at.to_le_bytes());
    b[16..20].copy_from_slice(&2u32.to_le_bytes()); // entries
    b[20..24].copy_from_slice(&252u32.to_le_bytes()); // max entries
    b[24..28].copy_from_slice(&8u32.to_le_bytes()); // value size
    for (i, (k, v)) in [(5u64, (7u64 << 24) | 3), (6, (8 << 24) | 4)]
        .into_iter()
        .enumerate()
    {
        b[32 + 8 * i..40 + 8 * i].copy_from_slice(&k.to_le_bytes());
        let o = 32 + 8 * 252 + 8 * i;
        b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    seal(&mut b, BlockKind::BTreeNode);
    let mut st = vec![0xa1, 0x20];
    st.extend_from_slice(&b[..32]); // header, literally
    st.extend_from_slice(&[0x01, 0x05, 0x11, 0x36, 0x60, 0xf9]); // keys 5, 6, 250 x 0
    st.extend_from_slice(&[0xb0, 0xfc]); // 252 values in two lists:
    st.extend_from_slice(&[0x01, 0x07, 0x11, 0x38, 0x60, 0xf9]); // data blocks 7, 8, 0...
    st.extend_from_slice(&[0x01, 0x03, 0x11, 0x34, 0x60, 0xf9]); // times 3, 4, 0...
    st.extend_from_slice(&[0xa1, 0x20]);
    st.extend_from_slice(&[0u8; 32]); // the 32 unused bytes at the end
    (b, st)
}

/// A block carrying a valid superblock checksum, and its literal stream.
fn superblock_and_stream() -> (Vec<u8>, Vec<u8>) {
    let mut b: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    b[8..16].copy_from_slice(&0u64.to_le_bytes());
    seal(&mut b, BlockKind::ThinSuperblock);
    let mut st = vec![0xa2, 0x00, 0x10];
    st.extend_from_slice(&b);
    (b, st)
}

#[test]
fn hand_written_pack_unpacks_to_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, sb_st) = superblock_and_stream();
    let (leaf, leaf_st) = leaf_and_stream(5);
    let pack = dir.path().join("hand.pack");
    std::fs::write(&pack, hand_pack(8, &[(5, leaf_st), (0, sb_st)])).unwrap();
    let mut want = vec![0u8; 8 * 4096];
    want[..4096].copy_from_slice(&sb);
    want[5 * 4096..6 * 4096].copy_from_slice(&leaf);

    // Onto a new file, and onto an old larger file full of other bytes:
    // the result is exactly the image.
    let out = dir.path().join("new.bin");
    ok("thin_metadata_unpack", &["-i", s(&pack), "-o", s(&out)]);
    assert!(std::fs::read(&out).unwrap() == want);
    let old = dir.path().join("old.bin");
    std::fs::write(&old, vec![0x5au8; 20 * 4096]).unwrap();
    ok(
        "thin_metadata_unpack",
        &["-i", s(&pack), "-o", s(&old), "-f"],
    );
    assert!(std::fs::read(&old).unwrap() == want);
    // A gzip-compressed pack is read too.
    let gz = dir.path().join("hand.pack.gz");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&std::fs::read(&pack).unwrap()).unwrap();
    std::fs::write(&gz, e.finish().unwrap()).unwrap();
    let out2 = dir.path().join("gz.bin");
    ok("thin_metadata_unpack", &["-i", s(&gz), "-o", s(&out2)]);
    assert!(std::fs::read(&out2).unwrap() == want);

    // Our packer writes the leaf with the very same instructions.
    let repacked = dir.path().join("re.pack");
    ok("thin_metadata_pack", &["-i", s(&out), "-o", s(&repacked)]);
    let re = std::fs::read(&repacked).unwrap();
    let mut z = flate2::read::ZlibDecoder::new(&re[40..]);
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut z, &mut raw).unwrap();
    let (_, leaf_st) = leaf_and_stream(5);
    let (_, sb_st) = superblock_and_stream();
    let mut expect = 0u64.to_le_bytes().to_vec();
    expect.extend_from_slice(&sb_st);
    expect.extend_from_slice(&5u64.to_le_bytes());
    expect.extend_from_slice(&leaf_st);
    assert!(raw == expect, "packer's instruction stream");
}

#[test]
fn blocks_without_a_metadata_checksum_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = kernel_small(dir.path());
    // Garbage in an unused block, and a node whose checksum broke.
    let mut bytes = std::fs::read(&img).unwrap();
    let used: Vec<usize> = (0..1024)
        .filter(|i| bytes[i * 4096..(i + 1) * 4096].iter().any(|&b| b != 0))
        .collect();
    bytes[1000 * 4096..1001 * 4096].fill(0xee);
    let victim = *used.last().unwrap();
    bytes[victim * 4096 + 100] ^= 1;
    std::fs::write(&img, &bytes).unwrap();
    let (_, back) = pack_and_unpack(dir.path(), &img);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), bytes.len());
    for i in 0..1024 {
        let blk = &got[i * 4096..(i + 1) * 4096];
        if i == 1000 || i == victim {
            assert!(blk.iter().all(|&b| b == 0), "block {i} left out");
        } else {
            assert_eq!(blk, &bytes[i * 4096..(i + 1) * 4096], "block {i}");
        }
    }
}

fn fails(tool: &str, args: &[&str], code: i32, phrase: &str) {
    let out = run(tool, args);
    assert_one_line_error(&out, &format!("{tool} {args:?}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{tool} {args:?}: {err}");
    assert!(err.contains(phrase), "{tool} {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn damaged_packs_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = kernel_small(dir.path());
    let (pack, _) = pack_and_unpack(dir.path(), &img);
    let good = std::fs::read(&pack).unwrap();
    let bad = dir.path().join("bad.pack");
    let out = dir.path().join("never.bin");
    let try_bad = |bytes: &[u8], phrase: &str| {
        std::fs::write(&bad, bytes).unwrap();
        fails(
            "thin_metadata_unpack",
            &["-i", s(&bad), "-o", s(&out)],
            65,
            phrase,
        );
        assert!(!out.exists(), "nothing written for a bad pack ({phrase})");
    };
    // Truncated anywhere but at a chunk boundary.
    for cut in [0, 7, 8, 31, 33, 39, 40, 41, good.len() / 2, good.len() - 1] {
        let phrase = if cut < 32 {
            "Not a pack file"
        } else {
            "truncated pack"
        };
        try_bad(&good[..cut], phrase);
    }
    // Not a pack at all (a metadata image).
    try_bad(&std::fs::read(&img).unwrap()[..8192], "Not a pack file");
    // A damaged compressed stream.
    let mut flip = good.clone();
    flip[200] ^= 0x40;
    try_bad(&flip, "corrupt pack");
    // Another version.
    let mut v = good.clone();
    v[8] = 2;
    try_bad(&v, "version 2");
    // A block beyond the image's end.
    let (_, leaf_st) = leaf_and_stream(9);
    try_bad(
        &hand_pack(8, &[(9, leaf_st.clone())]),
        "beyond the image's 8 blocks",
    );
    // An instruction no packer writes; a stream that ends early; a block
    // whose bytes carry no metadata checksum.
    try_bad(
        &hand_pack(16, &[(9, vec![0xc0])]),
        "unknown instruction 0xc0",
    );
    try_bad(
        &hand_pack(16, &[(9, leaf_st[..60].to_vec())]),
        "end in the middle",
    );
    let mut wrong = leaf_st.clone();
    wrong[20] ^= 1; // a header byte: the checksum no longer matches
    try_bad(&hand_pack(16, &[(9, wrong)]), "no valid metadata checksum");
}

#[test]
fn usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = kernel_small(dir.path());
    let (pack, _) = pack_and_unpack(dir.path(), &img);
    let sum = sha(&pack);
    fails(
        "thin_metadata_unpack",
        &["-i", s(&pack), "-o", s(&pack)],
        64,
        "is the input",
    );
    fails(
        "thin_metadata_pack",
        &["-i", s(&img), "-o", s(&img)],
        64,
        "is the input",
    );
    assert_eq!(sha(&pack), sum);
    let missing = dir.path().join("missing");
    fails(
        "thin_metadata_unpack",
        &["-i", s(&missing), "-o", s(&dir.path().join("x"))],
        66,
        "no such file",
    );
    fails(
        "thin_metadata_pack",
        &["-i", s(&missing), "-o", s(&dir.path().join("y"))],
        66,
        "no such file",
    );
    assert!(!dir.path().join("y").exists());
    let nowhere = dir.path().join("no/such/dir/out");
    fails(
        "thin_metadata_pack",
        &["-i", s(&img), "-o", s(&nowhere)],
        66,
        "cannot create the output file",
    );
    fails(
        "thin_metadata_unpack",
        &["-i", s(&pack), "-o", s(&nowhere)],
        66,
        "cannot create the output file",
    );
    let out = run("thin_metadata_pack", &["-i", s(&img)]);
    assert_eq!(out.status.code(), Some(64));
    let out = run("thin_metadata_unpack", &["-o", s(&img)]);
    assert_eq!(out.status.code(), Some(64));
}

// ---------------------------------------------------------------------------
// The original tool, where present (never in CI).

/// The original's source tree (its tests/testdata) and binary, if present.
fn peer_dir() -> Option<PathBuf> {
    let cands = [
        std::env::var_os("THINMETA_PEER_DIR").map(PathBuf::from),
        Some(repo().join("../peer")),
        Some(repo().join("../../peer")),
    ];
    cands
        .into_iter()
        .flatten()
        .find(|p| p.join("tests/testdata").is_dir())
}

fn peer_bin() -> Option<PathBuf> {
    let b = peer_dir()?.join("target/release/pdata_tools");
    b.is_file().then_some(b)
}

fn peer(args: &[&str]) -> Output {
    Command::new(peer_bin().unwrap())
        .args(args)
        .output()
        .expect("run the original tool")
}

/// The original's packs (its test suite's) unpack to the images recorded in
/// ../shared/testdata, and for the packs of one chunk our packer writes the
/// same bytes.
#[test]
fn unpacks_the_originals_packs() {
    let (Some(td), Some(pd)) = (shared_testdata(), peer_dir()) else {
        eprintln!("../shared/testdata or the original's tests/testdata not found: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut identical = 0;
    for e in std::fs::read_dir(td.join("peer")).unwrap() {
        let folder = e.unwrap().path();
        let name = folder.file_name().unwrap().to_str().unwrap().to_string();
        let their_pack = pd.join("tests/testdata").join(format!("{name}.pack"));
        let sums = folder.join("sha256.txt");
        if !their_pack.is_file() || !sums.is_file() {
            continue;
        }
        let want = std::fs::read_to_string(&sums).unwrap();
        let want = want.split_whitespace().next().unwrap().to_string();
        let out = dir.path().join(format!("{name}.bin"));
        ok(
            "thin_metadata_unpack",
            &["-i", s(&their_pack), "-o", s(&out)],
        );
        assert_eq!(sha(&out), want, "{name}: our unpack of the original's pack");
        // Our pack of that image: byte-identical when the original's pack
        // has one chunk (with more, its chunk order follows its threads).
        let ours = dir.path().join(format!("{name}.pack"));
        ok("thin_metadata_pack", &["-i", s(&out), "-o", s(&ours)]);
        let theirs = std::fs::read(&their_pack).unwrap();
        if chunk_lengths(&theirs).len() == 1 {
            assert!(
                std::fs::read(&ours).unwrap() == theirs,
                "{name}: our pack differs from the original's"
            );
            identical += 1;
        }
        n += 1;
    }
    assert!(n >= 8, "only {n} of the original's packs found");
    assert!(identical >= 4, "only {identical} packs byte-identical");
    eprintln!("{n} of the original's packs unpacked; {identical} of our packs byte-identical");
}

/// The original unpacker reads our packs to the identical image, and we
/// read the packs its packer writes now.
#[test]
fn the_original_unpacks_our_packs() {
    let Some(_) = peer_bin() else {
        eprintln!("the original's pdata_tools not found: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut images = vec![kernel_small(dir.path())];
    let gen = dir.path().join("gen.bin");
    std::fs::File::create(&gen)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    ok(
        "thin_generate_metadata",
        &[
            "-q",
            "-o",
            s(&gen),
            "--origins",
            "2",
            "--snaps",
            "3",
            "--segments",
            "300",
            "--writes",
            "300",
            "--metadata-snap",
        ],
    );
    images.push(gen);
    if let Some(td) = shared_testdata() {
        for e in std::fs::read_dir(td.join("peer")).unwrap() {
            let folder = e.unwrap().path();
            let name = folder.file_name().unwrap().to_str().unwrap().to_string();
            let gz = folder.join(format!("{name}.bin.gz"));
            if gz.is_file() {
                images.push(unpack(&gz, dir.path(), &format!("{name}.bin")));
            }
        }
    }
    // Our committed fixture, too.
    let fixture_out = dir.path().join("fixture.bin");
    let r = peer(&[
        "thin_metadata_unpack",
        "-i",
        s(&repo().join("tests/data/pack/kernel-small.pack")),
        "-o",
        s(&fixture_out),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(sha(&fixture_out), sha(&images[0]));

    for (i, img) in images.iter().enumerate() {
        let ours = dir.path().join(format!("ours{i}.pack"));
        let theirs = dir.path().join(format!("theirs{i}.pack"));
        let a = dir.path().join(format!("a{i}.bin"));
        let b = dir.path().join(format!("b{i}.bin"));
        ok("thin_metadata_pack", &["-i", s(img), "-o", s(&ours)]);
        let r = peer(&["thin_metadata_unpack", "-i", s(&ours), "-o", s(&a)]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(
            sha(&a),
            sha(img),
            "{}: the original's unpack of ours",
            img.display()
        );
        let r = peer(&["thin_metadata_pack", "-i", s(img), "-o", s(&theirs)]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        ok("thin_metadata_unpack", &["-i", s(&theirs), "-o", s(&b)]);
        assert_eq!(
            sha(&b),
            sha(img),
            "{}: our unpack of the original's",
            img.display()
        );
    }
    eprintln!("{} images: both directions identical", images.len());
}
