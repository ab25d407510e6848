//! Thumbnails and previews of images (PNG, JPEG, WebP, GIF), made with the `image` crate under
//! limits: the dimensions are read from the header first and an image of more pixels than allowed
//! is not decoded at all, and decoding allocates at most [`MAX_DECODE_ALLOC`]. Re-encoding keeps
//! no metadata, so EXIF (and GPS positions in it) never reaches a derivative.

use std::io::Cursor;

use confab_schema::attachment::{Derivative, PREVIEW_SIZE, THUMBNAIL_SIZE};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::domain::attachments::Made;

/// The most memory one decode may allocate.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// An image's dimensions, thumbnail and preview.
#[derive(Debug)]
pub struct Derived {
    pub width: u32,
    pub height: u32,
    pub thumbnail: Made,
    pub preview: Made,
}

fn reader(bytes: &[u8], max_alloc: u64) -> Result<ImageReader<Cursor<&[u8]>>, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP) => {}
        other => return Err(format!("not a supported image format: {other:?}")),
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_alloc);
    reader.limits(limits);
    Ok(reader)
}

/// Decodes `bytes` (at most `max_pixels` pixels) and makes its thumbnail (320 px on the longest
/// side, PNG when the image has transparency, else JPEG) and preview (32 px, low-quality JPEG).
pub fn derive(bytes: &[u8], max_pixels: u64) -> Result<Derived, String> {
    derive_within(bytes, max_pixels, MAX_DECODE_ALLOC)
}

/// [`derive`], allocating at most `max_alloc` bytes for the decoded image (and its turned copy).
fn derive_within(bytes: &[u8], max_pixels: u64, max_alloc: u64) -> Result<Derived, String> {
    let (width, height) = reader(bytes, max_alloc)?
        .into_dimensions()
        .map_err(|e| e.to_string())?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(format!("{width}×{height} is more than {max_pixels} pixels"));
    }
    let mut decoder = reader(bytes, max_alloc)?
        .into_decoder()
        .map_err(|e| e.to_string())?;
    // A camera stores a photo as its sensor saw it and says in EXIF how to turn it for viewing.
    // The derivatives keep no EXIF, so the turn is applied to their pixels, and the dimensions
    // given are the turned ones (a portrait photo is taller than wide).
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    // Decoding into an image does not hold the buffer it allocates to the reader's limits (only
    // some decoders check them), and a quarter turn copies the whole image: both are counted
    // here, before anything is allocated. (A 16-bit RGBA image within the pixel limit is
    // 8 bytes a pixel.)
    let turns = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let needed = decoder
        .total_bytes()
        .saturating_mul(if turns { 2 } else { 1 });
    if needed > max_alloc {
        return Err(format!(
            "decoding needs {needed} bytes, more than {max_alloc}"
        ));
    }
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    image.apply_orientation(orientation);
    let (width, height) = (image.width(), image.height());
    let thumbnail = within(&image, THUMBNAIL_SIZE);
    let thumbnail = if image.color().has_alpha() {
        encode_png(&thumbnail)?
    } else {
        encode_jpeg(&thumbnail, 80)?
    };
    let preview = encode_jpeg(&within(&image, PREVIEW_SIZE), 40)?;
    Ok(Derived {
        width,
        height,
        thumbnail,
        preview,
    })
}

/// `image` scaled down to fit `size` × `size`; one that fits already keeps its size (a picture of
/// an icon made larger would only cost bytes).
fn within(image: &DynamicImage, size: u32) -> DynamicImage {
    if image.width() <= size && image.height() <= size {
        image.clone()
    } else {
        image.thumbnail(size, size)
    }
}

fn made(bytes: Vec<u8>, image: &DynamicImage, content_type: &str) -> Made {
    Made {
        derivative: Derivative {
            sha256: String::new(),
            size: bytes.len() as u64,
            width: image.width(),
            height: image.height(),
            content_type: content_type.into(),
        },
        bytes,
    }
}

fn encode_png(image: &DynamicImage) -> Result<Made, String> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(made(bytes, image, "image/png"))
}

fn encode_jpeg(image: &DynamicImage, quality: u8) -> Result<Made, String> {
    let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
    let mut bytes = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality);
    rgb.write_with_encoder(encoder).map_err(|e| e.to_string())?;
    Ok(made(bytes, &rgb, "image/jpeg"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        }));
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .expect("encodes");
        bytes
    }

    /// A 200×100 JPEG whose EXIF says to turn it 90° clockwise for viewing (orientation 6), as a
    /// phone held upright writes it.
    fn jpeg_turned_by_exif() -> Vec<u8> {
        use image::ImageEncoder;
        // TIFF, big-endian: header, one IFD of one entry (0x0112 Orientation, SHORT, 1, value 6).
        let mut exif = b"MM\0\x2a\0\0\0\x08".to_vec();
        exif.extend_from_slice(&[0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        let image = image::RgbImage::from_fn(200, 100, |x, _| {
            image::Rgb([if x < 100 { 255 } else { 0 }, 0, 0])
        });
        let mut bytes = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90);
        encoder.set_exif_metadata(exif).expect("takes EXIF");
        encoder
            .write_image(image.as_raw(), 200, 100, image::ExtendedColorType::Rgb8)
            .expect("encodes");
        bytes
    }

    #[test]
    fn the_exif_orientation_is_applied_and_not_kept() {
        let bytes = jpeg_turned_by_exif();
        let mut original = reader(&bytes, MAX_DECODE_ALLOC)
            .unwrap()
            .into_decoder()
            .unwrap();
        assert_eq!(original.orientation().unwrap(), Orientation::Rotate90);
        let derived = derive(&bytes, 10_000_000).expect("derives");
        assert_eq!(
            (derived.width, derived.height),
            (100, 200),
            "turned upright"
        );
        let t = &derived.thumbnail;
        assert_eq!((t.derivative.width, t.derivative.height), (100, 200));
        // Turned 90° clockwise, the red left half of the stored pixels is the top half.
        let thumbnail = image::load_from_memory(&t.bytes).unwrap().to_rgb8();
        assert!(thumbnail.get_pixel(50, 20)[0] > 200, "red on top");
        assert!(thumbnail.get_pixel(50, 180)[0] < 50, "black at the bottom");
        for made in [&derived.thumbnail, &derived.preview] {
            let mut decoder = reader(&made.bytes, MAX_DECODE_ALLOC)
                .unwrap()
                .into_decoder()
                .unwrap();
            assert_eq!(decoder.exif_metadata().unwrap(), None, "no EXIF kept");
        }
    }

    #[test]
    fn thumbnails_and_previews_fit_their_boxes() {
        let derived = derive(&png(1000, 500), 10_000_000).expect("derives");
        assert_eq!((derived.width, derived.height), (1000, 500));
        let t = &derived.thumbnail.derivative;
        assert_eq!((t.width, t.height), (320, 160));
        assert_eq!(t.content_type, "image/jpeg");
        let p = &derived.preview.derivative;
        assert_eq!((p.width, p.height), (32, 16));
        assert!(p.size < 2_000, "a preview is small: {}", p.size);
    }

    #[test]
    fn a_small_image_is_not_made_larger() {
        let derived = derive(&png(64, 48), 10_000_000).expect("derives");
        let t = &derived.thumbnail.derivative;
        assert_eq!((t.width, t.height), (64, 48));
        let p = &derived.preview.derivative;
        assert_eq!((p.width, p.height), (32, 24));
    }

    /// The decoded image, and the copy a quarter turn makes, count against the allocation limit
    /// before anything is decoded: a small PNG of 16-bit pixels, or a photo turned by its EXIF,
    /// within the pixel limit, cannot make a decode take more memory than allowed.
    #[test]
    fn a_decode_is_held_to_its_allocation_limit() {
        let wide = DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(
            600,
            600,
            image::Rgba([1u16, 2, 3, 65535]),
        ));
        let mut bytes = Vec::new();
        wide.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .expect("encodes");
        assert!(bytes.len() < 100_000, "a small file: {}", bytes.len());
        // 600 × 600 × 8 bytes = 2,880,000.
        let refused = derive_within(&bytes, 10_000_000, 1 << 20).map(|d| (d.width, d.height));
        assert!(refused.is_err(), "decoded within 1 MiB: {refused:?}");
        assert!(derive_within(&bytes, 10_000_000, 3_000_000).is_ok());

        // 200 × 100 × 3 bytes = 60,000, twice for the turn.
        let turned = jpeg_turned_by_exif();
        let refused = derive_within(&turned, 10_000_000, 100_000).map(|d| (d.width, d.height));
        assert!(
            refused.is_err(),
            "decoded and turned within 100,000 bytes: {refused:?}"
        );
        assert!(derive_within(&turned, 10_000_000, 130_000).is_ok());
    }

    #[test]
    fn bombs_and_garbage_are_refused_without_decoding() {
        // A PNG header claiming 100000 × 100000 pixels, with no data behind it.
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(derive(&bomb, 50_000_000).is_err());
        assert!(derive(b"\x89PNG\r\n\x1a\nnot really", 50_000_000).is_err());
        assert!(derive(b"GIF89a", 50_000_000).is_err());
        assert!(derive(&[0xFF, 0xD8, 0xFF, 0, 1, 2], 50_000_000).is_err());
    }
}
