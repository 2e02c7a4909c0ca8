//! Seeded synthetic visual questions for training the vision tower.
//!
//! Each sample is a small rendered scene (coloured shapes, sometimes a short word) plus
//! one-word questions about it. Scenes are built so that every question has exactly one right
//! answer: shapes and colours never repeat, objects keep clear of each other, of the word and of
//! the middle line, and backgrounds are too pale to pass for an object colour.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f32::consts::{FRAC_PI_2, SQRT_2, TAU};

/// Side of every image, in pixels.
pub const IMAGE_SIZE: usize = 256;

/// Words a scene may show; three letters stay legible at the smallest scale and fit anywhere.
const WORDS: [&str; 8] = ["cat", "dog", "sun", "box", "hat", "cup", "pen", "key"];
/// Count answers, indexed by count - 1.
/// Counts are answered in digits, as the language model itself answers "how many" questions.
pub const COUNTS: [&str; 4] = ["1", "2", "3", "4"];
const MIN_RADIUS: f32 = 18.0;
const MAX_RADIUS: f32 = 36.0;
/// Clearance around objects and the word, so no two things ever touch.
const GAP: f32 = 6.0;
/// The vertical middle line, which splits "left" from "right".
const MIDDLE: f32 = IMAGE_SIZE as f32 / 2.0;
/// Distance of every centre from the middle line, so left/right is never a judgement call.
const SIDE_MARGIN: f32 = 24.0;
/// Placement attempts before an object is dropped; bounded so a crowded draw cannot hang.
const PLACE_TRIES: usize = 200;
const SQUARE_HALF: f32 = 0.85;
const STAR_INNER: f32 = 0.45;
const GLYPH_W: usize = 5;
const GLYPH_H: usize = 7;

/// Shape of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Filled disc.
    Circle,
    /// Axis-aligned filled square.
    Square,
    /// Filled upward triangle.
    Triangle,
    /// Filled five-pointed star.
    Star,
}

/// Every shape, in answer order.
pub const SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

impl Shape {
    /// Lowercase name, as used in questions and answers.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }
}

/// Fill colour of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

/// Every colour, in answer order.
pub const COLOURS: [Colour; 6] = [
    Colour::Red,
    Colour::Green,
    Colour::Blue,
    Colour::Yellow,
    Colour::Purple,
    Colour::Orange,
];

impl Colour {
    /// Lowercase name, as used in questions and answers.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// Saturated RGB value; each has at least one channel far below the 215 background floor.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 160, 50],
            Colour::Blue => [30, 70, 220],
            Colour::Yellow => [240, 200, 0],
            Colour::Purple => [130, 40, 170],
            Colour::Orange => [250, 120, 0],
        }
    }
}

/// One shape in a scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Its shape.
    pub shape: Shape,
    /// Its fill colour.
    pub colour: Colour,
    /// Centre x, in pixels.
    pub cx: f32,
    /// Centre y, in pixels (down is positive).
    pub cy: f32,
    /// Size in pixels: the disc's radius, the circumradius of the triangle and star, and
    /// 1/0.85 of the square's half-side.
    pub radius: f32,
}

impl Object {
    /// Farthest any of its pixels reach from the centre: beyond `radius` for the square's
    /// corners, which placement must keep clear too.
    fn reach(&self) -> f32 {
        match self.shape {
            Shape::Square => self.radius * SQUARE_HALF * SQRT_2,
            Shape::Circle | Shape::Triangle | Shape::Star => self.radius,
        }
    }
}

/// A short word drawn in the 5x7 bitmap font.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    /// The word, lowercase (drawn in uppercase).
    pub text: &'static str,
    /// Left edge, in pixels.
    pub x: usize,
    /// Top edge, in pixels.
    pub y: usize,
    /// Side, in pixels, of the block each font pixel becomes.
    pub scale: usize,
    /// Ink colour.
    pub colour: [u8; 3],
}

/// What an image shows, from which it is rendered and its questions asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// The shapes, no two alike in shape or colour.
    pub objects: Vec<Object>,
    /// The word, if the scene has one.
    pub word: Option<Word>,
    /// Background colour (every channel 215..=255).
    pub background: [u8; 3],
}

/// What a question asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuestionKind {
    /// Colour of a named shape.
    Colour,
    /// Shape of a named colour.
    Shape,
    /// Number of shapes.
    Count,
    /// Which half of the image a shape is in.
    Side,
    /// The written word.
    Text,
}

/// A question about a scene and its one-word answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// What it asks about.
    pub kind: QuestionKind,
    /// The question, in English.
    pub text: String,
    /// The answer: one of [`answer_words`].
    pub answer: &'static str,
}

/// A rendered scene with its questions.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `IMAGE_SIZE * IMAGE_SIZE * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
    /// What was rendered.
    pub scene: Scene,
    /// Every question the scene supports, shuffled.
    pub questions: Vec<Question>,
}

/// Which stream a sample comes from; the two never share a generator state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training stream.
    Train,
    /// Held-out stream.
    Test,
}

/// What covers a patch of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Nothing, or too little of anything.
    Background,
    /// The object at this index of `scene.objects`.
    Object(usize),
    /// The word.
    Word,
}

/// Every answer word the questions can have, in a fixed order (colours, shapes, counts
/// "1".."4", "left", "right", the words), so alignment targets can index them stably.
pub fn answer_words() -> Vec<&'static str> {
    let colours = COLOURS.iter().map(|c| c.name());
    let shapes = SHAPES.iter().map(|s| s.name());
    let rest = COUNTS.iter().chain(&["left", "right"]).chain(&WORDS);
    colours.chain(shapes).chain(rest.copied()).collect()
}

/// Sample `index` of `split` for `seed`: the same arguments always give the same sample.
pub fn sample(seed: u64, split: Split, index: u64) -> Sample {
    let mut rng = ChaCha8Rng::from_seed(sample_key(seed, split, index));
    let scene = random_scene(&mut rng);
    let rgb = render(&scene);
    let questions = questions(&scene, &mut rng);
    Sample {
        rgb,
        scene,
        questions,
    }
}

/// Lays the inputs side by side in the key rather than hashing them, so distinct
/// (seed, split, index) triples get distinct ChaCha keys: Train and Test can never collide.
fn sample_key(seed: u64, split: Split, index: u64) -> [u8; 32] {
    let tag: u64 = match split {
        Split::Train => 1,
        Split::Test => 2,
    };
    let mut key = [0u8; 32];
    let words = [seed, index, tag, 0x7669_7369_6f6e];
    for (chunk, word) in key.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    key
}

/// A random scene: 1 to 4 distinct objects and, half the time, a word.
pub fn random_scene(rng: &mut impl Rng) -> Scene {
    let background = [0u8; 3].map(|_| rng.random_range(215..=255));
    // The word goes first: it is the widest item, and an empty canvas always has room for it.
    let word = rng.random_bool(0.5).then(|| random_word(rng));
    let mut scene = Scene {
        objects: Vec::new(),
        word,
        background,
    };
    let mut shapes = SHAPES;
    shapes.shuffle(rng);
    let mut colours = COLOURS;
    colours.shuffle(rng);
    let count = rng.random_range(1..=SHAPES.len());
    for (&shape, &colour) in shapes.iter().zip(&colours).take(count) {
        if let Some(object) = place(shape, colour, &scene, rng) {
            scene.objects.push(object);
        }
    }
    // Every scene holds an object (so every image has questions): if the word left no room,
    // the word goes. Never seen in practice; it only changes a scene that would be empty.
    if scene.objects.is_empty() {
        scene.word = None;
        scene
            .objects
            .extend(place(shapes[0], colours[0], &scene, rng));
    }
    scene
}

fn random_word(rng: &mut impl Rng) -> Word {
    let text = WORDS[rng.random_range(0..WORDS.len())];
    let scale = rng.random_range(3..=4);
    let (width, height) = word_extent(text, scale);
    let grey = if rng.random_bool(0.5) { 0 } else { 64 };
    let x = rng.random_range(0..=IMAGE_SIZE - width);
    let y = rng.random_range(0..=IMAGE_SIZE - height);
    Word {
        text,
        x,
        y,
        scale,
        colour: [grey; 3],
    }
}

/// Width and height in pixels of `text` at `scale`, with one font pixel between letters.
fn word_extent(text: &str, scale: usize) -> (usize, usize) {
    let letters = text.len().max(1);
    ((letters * (GLYPH_W + 1) - 1) * scale, GLYPH_H * scale)
}

/// Tries random spots for an object clear of what `scene` holds; `None` after `PLACE_TRIES`.
fn place(shape: Shape, colour: Colour, scene: &Scene, rng: &mut impl Rng) -> Option<Object> {
    let size = IMAGE_SIZE as f32;
    (0..PLACE_TRIES).find_map(|_| {
        let radius = rng.random_range(MIN_RADIUS..=MAX_RADIUS);
        let mut object = Object {
            shape,
            colour,
            cx: 0.0,
            cy: 0.0,
            radius,
        };
        let reach = object.reach();
        object.cx = if rng.random_bool(0.5) {
            rng.random_range(reach..=MIDDLE - SIDE_MARGIN)
        } else {
            rng.random_range(MIDDLE + SIDE_MARGIN..=size - reach)
        };
        object.cy = rng.random_range(reach..=size - reach);
        clear(&object, scene).then_some(object)
    })
}

/// Whether `object` keeps `GAP` from every object in `scene` and from its word's box.
fn clear(object: &Object, scene: &Scene) -> bool {
    let apart = scene.objects.iter().all(|other| {
        let distance = (other.cx - object.cx).hypot(other.cy - object.cy);
        distance >= other.reach() + object.reach() + GAP
    });
    let word = scene.word.as_ref();
    apart && word.is_none_or(|w| box_distance(w, object.cx, object.cy) >= object.reach() + GAP)
}

/// Distance from (x, y) to the word's bounding box; zero inside it.
fn box_distance(word: &Word, x: f32, y: f32) -> f32 {
    let (width, height) = word_extent(word.text, word.scale);
    let (left, top) = (word.x as f32, word.y as f32);
    let dx = (left - x).max(x - (left + width as f32)).max(0.0);
    let dy = (top - y).max(y - (top + height as f32)).max(0.0);
    dx.hypot(dy)
}

/// Renders `scene` as `IMAGE_SIZE * IMAGE_SIZE * 3` bytes, row-major RGB.
pub fn render(scene: &Scene) -> Vec<u8> {
    let mut rgb = scene.background.repeat(IMAGE_SIZE * IMAGE_SIZE);
    let mut paint = |x: usize, y: usize, colour: [u8; 3]| {
        let at = (y * IMAGE_SIZE + x) * 3;
        rgb[at..at + 3].copy_from_slice(&colour);
    };
    for object in &scene.objects {
        let colour = object.colour.rgb();
        object_pixels(object, |x, y| paint(x, y, colour));
    }
    if let Some(word) = &scene.word {
        word_pixels(word, |x, y| paint(x, y, word.colour));
    }
    rgb
}

/// Calls `visit` with every on-canvas pixel whose centre lies inside `object`.
fn object_pixels(object: &Object, mut visit: impl FnMut(usize, usize)) {
    let outline = unit_outline(object.shape);
    let (r, reach) = (object.radius, object.reach());
    let low = |c: f32| (c - reach).floor().max(0.0) as usize;
    let high = |c: f32| ((c + reach).ceil().max(0.0) as usize).min(IMAGE_SIZE);
    for y in low(object.cy)..high(object.cy) {
        for x in low(object.cx)..high(object.cx) {
            let dx = (x as f32 + 0.5 - object.cx) / r;
            let dy = (y as f32 + 0.5 - object.cy) / r;
            let inside = match object.shape {
                Shape::Circle => dx * dx + dy * dy <= 1.0,
                Shape::Square => dx.abs().max(dy.abs()) <= SQUARE_HALF,
                Shape::Triangle | Shape::Star => in_polygon(&outline, dx, dy),
            };
            if inside {
                visit(x, y);
            }
        }
    }
}

/// Polygon of a unit-radius triangle or star centred on the origin, first point straight up;
/// empty for shapes that are not drawn as polygons. Built once per object, not per pixel.
fn unit_outline(shape: Shape) -> Vec<[f32; 2]> {
    let (points, inner) = match shape {
        Shape::Triangle => (3, 1.0),
        Shape::Star => (10, STAR_INNER),
        Shape::Circle | Shape::Square => return Vec::new(),
    };
    (0..points)
        .map(|k| {
            let angle = -FRAC_PI_2 + TAU * k as f32 / points as f32;
            let r = if k % 2 == 1 { inner } else { 1.0 };
            [r * angle.cos(), r * angle.sin()]
        })
        .collect()
}

/// Even-odd ray test, which handles the star's concave corners.
fn in_polygon(polygon: &[[f32; 2]], x: f32, y: f32) -> bool {
    let mut inside = false;
    for (a, b) in polygon.iter().zip(polygon.iter().cycle().skip(1)) {
        // The first test guarantees a[1] != b[1], so the division is safe.
        if (a[1] > y) != (b[1] > y) && x < a[0] + (y - a[1]) * (b[0] - a[0]) / (b[1] - a[1]) {
            inside = !inside;
        }
    }
    inside
}

/// Calls `visit` with every on-canvas pixel of the word's ink.
fn word_pixels(word: &Word, mut visit: impl FnMut(usize, usize)) {
    let s = word.scale;
    for (i, letter) in word.text.bytes().enumerate() {
        let left = word.x + i * (GLYPH_W + 1) * s;
        for (row, bits) in glyph(letter).into_iter().enumerate() {
            for col in (0..GLYPH_W).filter(|col| bits >> (GLYPH_W - 1 - col) & 1 == 1) {
                let (x0, y0) = (left + col * s, word.y + row * s);
                for y in (y0..y0 + s).filter(|&y| y < IMAGE_SIZE) {
                    for x in (x0..x0 + s).filter(|&x| x < IMAGE_SIZE) {
                        visit(x, y);
                    }
                }
            }
        }
    }
}

/// 5x7 glyph of `letter` (either case), one byte per row, leftmost pixel in bit 4. Only the
/// letters of `WORDS` are drawn; anything else is blank.
fn glyph(letter: u8) -> [u8; GLYPH_H] {
    match letter.to_ascii_uppercase() {
        b'A' => [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        b'B' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        b'C' => [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e],
        b'D' => [0x1e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1e],
        b'E' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f],
        b'G' => [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f],
        b'H' => [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        b'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        b'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        b'O' => [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        b'P' => [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10],
        b'S' => [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e],
        b'T' => [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        b'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        b'X' => [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11],
        b'Y' => [0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04],
        _ => [0; GLYPH_H],
    }
}

/// Every question `scene` supports (colour, shape and side per object, the count, the word),
/// shuffled with `rng`.
pub fn questions(scene: &Scene, rng: &mut impl Rng) -> Vec<Question> {
    let mut asked = Vec::new();
    for object in &scene.objects {
        let (shape, colour) = (object.shape.name(), object.colour.name());
        let side = if object.cx < MIDDLE { "left" } else { "right" };
        let colour_of = format!("What colour is the {shape}?");
        let shape_of = format!("What shape is {colour}?");
        let side_of = format!("Is the {shape} on the left or the right?");
        asked.push((QuestionKind::Colour, colour_of, colour));
        asked.push((QuestionKind::Shape, shape_of, shape));
        asked.push((QuestionKind::Side, side_of, side));
    }
    // An empty scene (every placement failed) has no count word, so it gets no count question.
    if let Some(&count) = COUNTS.get(scene.objects.len().wrapping_sub(1)) {
        let text = "How many shapes are there?";
        asked.push((QuestionKind::Count, text.into(), count));
    }
    if let Some(word) = &scene.word {
        let text = "What word is written?";
        asked.push((QuestionKind::Text, text.into(), word.text));
    }
    let ask = |(kind, text, answer)| Question { kind, text, answer };
    let mut out: Vec<Question> = asked.into_iter().map(ask).collect();
    out.shuffle(rng);
    out
}

/// For each patch of a `side x side` grid of `patch`-pixel patches (row-major, `side =
/// IMAGE_SIZE / patch`), what covers it: the object or the word whose pixels cover the largest
/// share of the patch when that share is at least `min_share` (e.g. 0.2), else background.
pub fn patch_owners(scene: &Scene, patch: usize, min_share: f32) -> Vec<Owner> {
    if patch == 0 {
        return Vec::new();
    }
    let (side, objects) = (IMAGE_SIZE / patch, scene.objects.len());
    let mut counts = vec![vec![0usize; objects + 1]; side * side];
    let mut tally = |owner: usize, x: usize, y: usize| {
        // Pixels past the last whole patch (when `patch` does not divide the image) count for none.
        let (column, row) = (x / patch, y / patch);
        if column < side && row < side {
            counts[row * side + column][owner] += 1;
        }
    };
    for (k, object) in scene.objects.iter().enumerate() {
        object_pixels(object, |x, y| tally(k, x, y));
    }
    if let Some(word) = &scene.word {
        word_pixels(word, |x, y| tally(objects, x, y));
    }
    let needed = min_share * (patch * patch) as f32;
    counts.iter().map(|cell| largest(cell, needed)).collect()
}

/// The owner with most pixels in one patch's counts (objects by index, the word last), or
/// background when it has fewer than `needed`.
fn largest(counts: &[usize], needed: f32) -> Owner {
    let word = counts.len().saturating_sub(1);
    match counts.iter().enumerate().max_by_key(|&(_, &n)| n) {
        Some((k, &n)) if n > 0 && n as f32 >= needed && k < word => Owner::Object(k),
        Some((_, &n)) if n > 0 && n as f32 >= needed => Owner::Word,
        _ => Owner::Background,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(count: u64) -> impl Iterator<Item = Sample> {
        (0..count).map(|i| sample(7, Split::Train, i))
    }

    fn pixel(rgb: &[u8], x: usize, y: usize) -> [u8; 3] {
        let at = (y * IMAGE_SIZE + x) * 3;
        [rgb[at], rgb[at + 1], rgb[at + 2]]
    }

    /// Whether anything in `scene` comes within `slack` pixels of (x, y).
    fn near_anything(scene: &Scene, x: f32, y: f32, slack: f32) -> bool {
        let near = |o: &Object| (o.cx - x).hypot(o.cy - y) < o.reach() + slack;
        let word = scene.word.as_ref();
        scene.objects.iter().any(near) || word.is_some_and(|w| box_distance(w, x, y) < slack)
    }

    #[test]
    fn samples_are_deterministic_and_streams_differ() {
        let a = sample(3, Split::Train, 5);
        assert_eq!(a, sample(3, Split::Train, 5));
        assert_eq!(a.rgb.len(), IMAGE_SIZE * IMAGE_SIZE * 3);
        assert_ne!(a.rgb, sample(3, Split::Train, 6).rgb);
        assert_ne!(a.rgb, sample(3, Split::Test, 5).rgb);
        assert_ne!(a.rgb, sample(4, Split::Train, 5).rgb);
    }

    #[test]
    fn render_paints_objects_and_leaves_background_elsewhere() {
        for s in samples(40) {
            for o in &s.scene.objects {
                assert_eq!(pixel(&s.rgb, o.cx as usize, o.cy as usize), o.colour.rgb());
            }
            if let Some(w) = &s.scene.word {
                assert!(
                    s.rgb.chunks_exact(3).any(|p| p == w.colour),
                    "word not drawn"
                );
            }
            for (x, y) in (0..IMAGE_SIZE).flat_map(|y| (0..IMAGE_SIZE).map(move |x| (x, y))) {
                if !near_anything(&s.scene, x as f32 + 0.5, y as f32 + 0.5, 1.0) {
                    assert_eq!(pixel(&s.rgb, x, y), s.scene.background, "({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn scenes_follow_the_rules() {
        let mut with_word = 0;
        for s in samples(300) {
            let (objects, size) = (&s.scene.objects, IMAGE_SIZE as f32);
            assert!((1..=4).contains(&objects.len()));
            assert!(s.scene.background.iter().all(|&c| c >= 215));
            for (i, a) in objects.iter().enumerate() {
                assert!((MIN_RADIUS..=MAX_RADIUS).contains(&a.radius));
                assert!(a.cx >= a.reach() && a.cx + a.reach() <= size);
                assert!(a.cy >= a.reach() && a.cy + a.reach() <= size);
                assert!((a.cx - MIDDLE).abs() >= SIDE_MARGIN);
                if let Some(w) = &s.scene.word {
                    assert!(
                        box_distance(w, a.cx, a.cy) >= a.reach() + GAP,
                        "{a:?} {w:?}"
                    );
                }
                for b in &objects[i + 1..] {
                    assert!(a.shape != b.shape && a.colour != b.colour, "{a:?} {b:?}");
                    let distance = (a.cx - b.cx).hypot(a.cy - b.cy);
                    assert!(distance >= a.reach() + b.reach() + GAP, "{a:?} {b:?}");
                }
            }
            if let Some(w) = &s.scene.word {
                with_word += 1;
                let (width, height) = word_extent(w.text, w.scale);
                assert!(w.x + width <= IMAGE_SIZE && w.y + height <= IMAGE_SIZE);
                assert!(w.text.bytes().all(|b| glyph(b) != [0; GLYPH_H]));
            }
        }
        assert!(
            (100..200).contains(&with_word),
            "{with_word} of 300 have a word"
        );
    }

    #[test]
    fn questions_have_known_answers_and_correct_counts() {
        let words = answer_words();
        for s in samples(200) {
            let (n, word) = (s.scene.objects.len(), s.scene.word.as_ref());
            assert_eq!(s.questions.len(), 3 * n + 1 + usize::from(word.is_some()));
            for q in &s.questions {
                assert!(words.contains(&q.answer), "{q:?}");
                match q.kind {
                    QuestionKind::Count => assert_eq!(q.answer, COUNTS[n - 1]),
                    QuestionKind::Text => assert_eq!(Some(q.answer), word.map(|w| w.text)),
                    _ => {}
                }
            }
            for o in &s.scene.objects {
                let side = if o.cx < MIDDLE { "left" } else { "right" };
                let about = |q: &&Question| q.text.contains(o.shape.name());
                let answers: Vec<_> = s.questions.iter().filter(about).map(|q| q.answer).collect();
                assert!(answers.contains(&o.colour.name()) && answers.contains(&side));
            }
        }
    }

    #[test]
    fn patch_owners_match_the_scene() {
        for (patch, share) in [(16, 0.2), (8, 0.2)] {
            let side = IMAGE_SIZE / patch;
            let reach = patch as f32 / SQRT_2;
            for s in samples(100) {
                let owners = patch_owners(&s.scene, patch, share);
                assert_eq!(owners.len(), side * side);
                for (k, o) in s.scene.objects.iter().enumerate() {
                    let cell = (o.cy as usize / patch) * side + o.cx as usize / patch;
                    assert_eq!(owners[cell], Owner::Object(k), "patch {patch} {o:?}");
                }
                for (cell, &owner) in owners.iter().enumerate() {
                    let centre = |i: usize| (i * patch) as f32 + patch as f32 / 2.0;
                    let (x, y) = (centre(cell % side), centre(cell / side));
                    if !near_anything(&s.scene, x, y, reach) {
                        assert_eq!(owner, Owner::Background, "patch {patch} cell {cell}");
                    }
                }
                let word_patches = owners.iter().filter(|&&o| o == Owner::Word).count();
                assert_eq!(word_patches > 0, s.scene.word.is_some(), "patch {patch}");
            }
        }
        assert!(patch_owners(&sample(1, Split::Test, 0).scene, 0, 0.2).is_empty());
    }

    #[test]
    fn answer_words_are_unique_and_ordered() {
        let words = answer_words();
        assert_eq!(words.len(), 6 + 4 + 4 + 2 + 8);
        assert_eq!((words[0], words[6], words[10]), ("red", "circle", "1"));
        let mut sorted = words.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), words.len());
    }
}
