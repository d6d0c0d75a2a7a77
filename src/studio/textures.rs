//! GPU textures for the worker's pictures, uploaded once per picture rather than every frame.

use std::collections::HashMap;

use eframe::egui;

use super::worker::Picture;

/// Textures by the caller's key; a key is uploaded again only when its stamp changes.
#[derive(Default)]
pub struct Textures {
    cache: HashMap<String, (u64, egui::TextureHandle)>,
}

impl Textures {
    /// The texture of `picture` under `key`, uploaded if `stamp` differs from the last upload.
    pub fn get(
        &mut self,
        ctx: &egui::Context,
        key: &str,
        stamp: u64,
        picture: &Picture,
    ) -> egui::TextureHandle {
        if let Some((s, handle)) = self.cache.get(key)
            && *s == stamp
        {
            return handle.clone();
        }
        let image = egui::ColorImage::from_rgb([picture.width, picture.height], &picture.rgb);
        // Small pictures (the demo model's 64 px) stay crisp when shown larger.
        let filter = if picture.width < 256 {
            egui::TextureOptions::NEAREST
        } else {
            egui::TextureOptions::LINEAR
        };
        let handle = ctx.load_texture(key, image, filter);
        self.cache.insert(key.to_string(), (stamp, handle.clone()));
        handle
    }
}
