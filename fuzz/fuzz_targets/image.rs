//! Photos for the image classifiers: decode a JPEG or PNG to RGB, then apply ImageNet's
//! evaluation transform (resize, centre crop, normalise).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nerve_data::vision::{decode_rgb, ImagePreprocess};

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode_rgb(data) else {
        return;
    };
    assert_eq!(img.pixels.len(), img.width * img.height * 3);
    let pre = ImagePreprocess {
        resize: 16,
        crop: 12,
        ..ImagePreprocess::imagenet()
    };
    if let Ok(t) = pre.apply(&img) {
        assert_eq!(t.dims(), &[3, 12, 12]);
    }
});
