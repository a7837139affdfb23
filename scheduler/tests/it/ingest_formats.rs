//! Formats are told by content, not by extension: PNG, JPEG, WebP, BMP and
//! TIFF, each made here with the `image` crate, ingested from a folder
//! where every file has a misleading name.

#![allow(clippy::unwrap_used)]

use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::ingest;
use sieve_testkit::ProjectEnv;

fn encode(format: image::ImageFormat, width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 40) as u8, (y * 40) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn png_jpeg_webp_bmp_and_tiff_are_ingested_by_content() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 10).await;
    let dir = tempfile::tempdir().unwrap();
    let formats = [
        (image::ImageFormat::Png, 3),
        (image::ImageFormat::Jpeg, 4),
        (image::ImageFormat::WebP, 5),
        (image::ImageFormat::Bmp, 6),
        (image::ImageFormat::Tiff, 7),
    ];
    for (format, side) in formats {
        // Named as something else, so only the content can tell.
        std::fs::write(
            dir.path().join(format!("image-{side}.dat")),
            encode(format, side, side + 1),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("fake.webp"), b"RIFF\0\0\0\0WEBPnope").unwrap();

    let summary = ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(
        (summary.new_items, summary.failed, summary.dispatched),
        (5, 1, 5),
        "{summary:?}"
    );
    assert!(summary.failures[0].path.ends_with("fake.webp"));
    let items = env.items().await;
    for (_, side) in formats {
        let item = items
            .iter()
            .find(|i| i.source.ends_with(&format!("image-{side}.dat")))
            .unwrap();
        assert_eq!(item.state, ItemState::Queued);
        assert_eq!(
            (item.width, item.height),
            (Some(side as i32), Some(side as i32 + 1))
        );
        // Stored as it came, so the worker decodes the original bytes.
        let stored = env.ctx.store.get(&item.object_key).await.unwrap();
        assert_eq!(stored.len() as i64, item.size_bytes);
    }
    assert_eq!(env.jobs(5).await, 5);
    env.teardown().await;
}
