//! Artifacts written and read, in MiB/s, in a folder and in an S3 bucket (moto's server, a real
//! S3 wire peer run by Python on this machine: its figure is moto's more than ours). Files of
//! 64 MiB arrive in 1 MiB parts, as an HTTP answer does; each is different, so none is stored
//! once for another. `cargo bench --bench artifacts`; `SWITCHYARD_MOTO` names moto's server.

use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
use switchyard_engine::artifacts::Artifacts;

const FILE_MIB: usize = 64;
const FILES: usize = 4;

async fn measure(place: &str, location: &str) {
    let dir =
        std::env::temp_dir().join(format!("switchyard-artifact-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = switchyard_engine::store::connect(&format!("sqlite://{}/a.db", dir.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let artifacts = Artifacts::open(location, store, (FILE_MIB as u64 + 1) << 20).unwrap();
    let part = vec![0u8; 1 << 20];
    let mut saved = Vec::new();
    let start = Instant::now();
    for file in 0..FILES {
        let parts = (0..FILE_MIB).map(|i| {
            let mut bytes = part.clone();
            bytes[..16].copy_from_slice(&((file * FILE_MIB + i) as u128).to_le_bytes());
            Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
        });
        saved.push(
            artifacts
                .save("application/octet-stream", futures::stream::iter(parts))
                .await
                .unwrap(),
        );
    }
    let wrote = start.elapsed();
    let start = Instant::now();
    let mut read = 0usize;
    for file in &saved {
        let mut stream = artifacts.read(&file.sha256).await.unwrap();
        while let Some(chunk) = stream.try_next().await.unwrap() {
            read += chunk.len();
        }
    }
    let took = start.elapsed();
    let mib = (FILES * FILE_MIB) as f64;
    assert_eq!(read, (FILES * FILE_MIB) << 20);
    println!(
        "{place:>6}: write {:.0} MiB/s, read {:.0} MiB/s ({FILES} files of {FILE_MIB} MiB)",
        mib / wrote.as_secs_f64(),
        mib / took.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("artifacts, {cores} cores");
    // `--artifacts s3://` reads its endpoint and keys from the environment, as the binary does.
    let s3 = switchyard_engine::testing::s3_server();
    if let Some(s3) = &s3 {
        for (k, v) in s3.env() {
            // SAFETY: no other thread runs yet (the runtime starts below).
            unsafe { std::env::set_var(k, v) };
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let folder =
            std::env::temp_dir().join(format!("switchyard-artifact-files-{}", std::process::id()));
        measure("folder", folder.to_str().unwrap()).await;
        let _ = std::fs::remove_dir_all(folder);
        match &s3 {
            Some(_) => measure("s3", "s3://artifacts/bench").await,
            None => println!("    s3: no moto server (SWITCHYARD_MOTO)"),
        }
    });
}
