//! Box annotations that a detection project already has, read so that they
//! can be imported as ground truth.
//!
//! Three formats, chosen by the path (see [`read`]):
//! - Pascal VOC: one XML file per image, `<annotation>` with `<filename>`,
//!   an optional `<size>` (`<width>`, `<height>`) and an `<object>` per box
//!   (`<name>`, and `<bndbox>` with `<xmin>`, `<ymin>`, `<xmax>`,
//!   `<ymax>`); or a directory of such files.
//! - CSV as deepforest writes it: a header naming at least
//!   `image_path,xmin,ymin,xmax,ymax,label` (in any order; other columns are
//!   ignored), then one row per box. Rows of the same image make one image.
//!   A row whose four coordinates are all 0 is deepforest's way to say that
//!   an image holds no object. Fields may be quoted (`""` for a quote
//!   inside) but, as in ingest manifests, not span lines.
//! - COCO JSON: `images` (`id`, `file_name`, `width`, `height`),
//!   `annotations` (`image_id`, `category_id`, `bbox` as `[x, y, width,
//!   height]`) and `categories` (`id`, `name`: the boxes' label).
//!
//! Whatever the format, a box comes out as its corners in pixels of the
//! original image, `x_min, y_min` top left and `x_max, y_max` bottom right,
//! taken as the file writes them: whole or decimal, with no rounding and no
//! shift for VOC's 1-based habit, so that an import gives back the numbers
//! the user sees in their files. An image path is also as written; a
//! relative one is relative to the annotation file's directory, and
//! resolving it is the caller's.
//!
//! Reading checks everything a file says by itself (numbers, box extents,
//! boxes inside a stated image size, labels, required fields) and collects
//! every problem with its place in the file, so that a user fixes them all
//! in one go; it stops after [`MAX_ERRORS`]. A file with any problem gives
//! no images: an import is all or nothing. What needs the image itself, its
//! size where the file does not state it, is left to the caller, who reads
//! the image and asks [`check_box`].
//!
//! Pure code: no database, no async. Files are read whole; annotation files
//! are small next to the images they describe.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Reading stops after this many errors (and says so in one more): enough
/// to fix a file in one go, few enough to read.
pub const MAX_ERRORS: usize = 100;

/// What [`read`] tells a user who gave it a file it does not read.
const FORMATS: &str = "sieve reads box annotations as Pascal VOC (a *.xml file, or a \
     directory of them, one per image), CSV (*.csv with a header naming \
     image_path,xmin,ymin,xmax,ymax,label) or COCO JSON (*.json)";

/// The four corners' names, in the order the formats write them.
const CORNERS: [&str; 4] = ["xmin", "ymin", "xmax", "ymax"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationFormat {
    Voc,
    Csv,
    Coco,
}

impl AnnotationFormat {
    /// A short lower-case name, for messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            AnnotationFormat::Voc => "voc",
            AnnotationFormat::Csv => "csv",
            AnnotationFormat::Coco => "coco",
        }
    }
}

/// One image's boxes as an annotation file gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnotatedImage {
    /// The image's path as the file writes it (VOC `<filename>`, CSV
    /// `image_path`, COCO `file_name`); a relative path is relative to the
    /// annotation file's directory.
    pub path: String,
    /// The annotation file that names the image: the one given to [`read`],
    /// or, for a directory, the one of its files. `at` and the boxes' `at`
    /// are places in this file.
    pub file: PathBuf,
    /// Where the image is named.
    pub at: Location,
    /// `(width, height)` where the file states it (VOC `<size>`, COCO
    /// `width` and `height`); the boxes were checked against it. `None` for
    /// CSV, and where a VOC or COCO file leaves it out.
    pub size: Option<(u32, u32)>,
    /// May be empty: an image known to hold no object.
    pub boxes: Vec<AnnotatedBox>,
}

/// One box: its label and its corners in pixels of the original image.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnotatedBox {
    pub at: Location,
    pub label: String,
    pub x_min: f64,
    pub y_min: f64,
    pub x_max: f64,
    pub y_max: f64,
}

/// Where something is in an annotation file, for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A 1-based line number.
    Line(u64),
    /// An entry of a COCO file, e.g. `annotations[3] (id 17)`: a parsed JSON
    /// value keeps no line.
    Entry(String),
}

impl Location {
    /// The line number, where the location is one.
    pub fn line(&self) -> Option<u64> {
        match self {
            Location::Line(line) => Some(*line),
            Location::Entry(_) => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(line) => write!(f, "line {line}"),
            Location::Entry(entry) => f.write_str(entry),
        }
    }
}

/// Something wrong in an annotation file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    pub file: PathBuf,
    pub at: Option<Location>,
    /// What is wrong, in words that tell the user what to fix.
    pub reason: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{}, {at}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for AnnotationError {}

/// Reads the annotations at `path`: a directory (every `*.xml` in it, by
/// name, as Pascal VOC), a `*.xml` (VOC), a `*.csv` or a `*.json` (COCO).
///
/// Each image appears once in the result, in the order the file first names
/// it. Any problem, anywhere, gives `Err` with all of them (up to
/// [`MAX_ERRORS`]) and no images.
pub fn read(path: &Path) -> Result<(AnnotationFormat, Vec<AnnotatedImage>), Vec<AnnotationError>> {
    let mut errors = Errors::default();
    let (format, images) = if path.is_dir() {
        (AnnotationFormat::Voc, read_voc_dir(path, &mut errors))
    } else {
        let format = if has_extension(path, "xml") {
            AnnotationFormat::Voc
        } else if has_extension(path, "csv") {
            AnnotationFormat::Csv
        } else if has_extension(path, "json") {
            AnnotationFormat::Coco
        } else {
            errors.add(path, None, FORMATS);
            return Err(errors.list);
        };
        let images = match read_text(path, &mut errors) {
            None => Vec::new(),
            Some(text) => match format {
                AnnotationFormat::Voc => read_voc(path, &text, &mut errors).into_iter().collect(),
                AnnotationFormat::Csv => read_csv(path, &text, &mut errors),
                AnnotationFormat::Coco => read_coco(path, &text, &mut errors),
            },
        };
        (format, images)
    };
    if errors.list.is_empty() {
        Ok((format, images))
    } else {
        Err(errors.list)
    }
}

/// Checks a box against its image's size: for an image whose size the
/// annotation file does not state (CSV, a VOC file without `<size>`), the
/// caller reads the size from the image and asks. The error names every
/// problem, in the words [`read`] uses.
pub fn check_box(b: &AnnotatedBox, width: u32, height: u32) -> Result<(), String> {
    let mut problems = extent_problems(b);
    problems.extend(placement_problems(b, Some((width, height))));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The errors of one [`read`], up to [`MAX_ERRORS`].
#[derive(Default)]
struct Errors {
    list: Vec<AnnotationError>,
    stopped: bool,
}

impl Errors {
    fn add(&mut self, file: &Path, at: Option<Location>, reason: impl Into<String>) {
        if self.stopped {
            return;
        }
        if self.list.len() == MAX_ERRORS {
            self.stopped = true;
            self.list.push(AnnotationError {
                file: file.to_path_buf(),
                at: None,
                reason: format!(
                    "reading stopped after {MAX_ERRORS} errors: fix these and read the file again"
                ),
            });
            return;
        }
        self.list.push(AnnotationError {
            file: file.to_path_buf(),
            at,
            reason: reason.into(),
        });
    }

    /// Whether reading should stop.
    fn full(&self) -> bool {
        self.stopped
    }
}

fn has_extension(path: &Path, extension: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(extension))
}

/// The file as UTF-8 text, without a byte-order mark (some editors write
/// one; the parsers would take it for content).
fn read_text(file: &Path, errors: &mut Errors) -> Option<String> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            errors.add(file, None, format!("cannot read the file: {e}"));
            return None;
        }
    };
    match String::from_utf8(bytes) {
        Ok(text) => Some(match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_owned(),
            None => text,
        }),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            errors.add(
                file,
                Some(Location::Line(line as u64)),
                "not UTF-8 text: save the file as UTF-8",
            );
            None
        }
    }
}

// --- Boxes: the checks every format shares ---

/// Parses the four corners as written, or says what is wrong with each.
fn parse_corners(written: [&str; 4], names: [&str; 4]) -> Result<[f64; 4], Vec<String>> {
    let mut corners = [0.0; 4];
    let mut problems = Vec::new();
    for ((corner, text), name) in corners.iter_mut().zip(written).zip(names) {
        let text = text.trim();
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() => *corner = value,
            Ok(_) => problems.push(format!("{name} {text} is not a finite number")),
            Err(_) if text.is_empty() => problems.push(format!("{name} is empty")),
            Err(_) => problems.push(format!("{name} {text:?} is not a number")),
        }
    }
    if problems.is_empty() {
        Ok(corners)
    } else {
        Err(problems)
    }
}

/// "box 10,20,5,40 of tree", as messages name a box.
fn describe(b: &AnnotatedBox) -> String {
    let corners = format!("box {},{},{},{}", b.x_min, b.y_min, b.x_max, b.y_max);
    if b.label.is_empty() {
        corners
    } else {
        format!("{corners} of {}", b.label)
    }
}

/// A box with no area: the corners are swapped or equal.
fn extent_problems(b: &AnnotatedBox) -> Vec<String> {
    let mut problems = Vec::new();
    if b.x_max <= b.x_min {
        problems.push(format!(
            "{} has zero or negative width (x_max {} <= x_min {})",
            describe(b),
            b.x_max,
            b.x_min
        ));
    }
    if b.y_max <= b.y_min {
        problems.push(format!(
            "{} has zero or negative height (y_max {} <= y_min {})",
            describe(b),
            b.y_max,
            b.y_min
        ));
    }
    problems
}

/// A box that is not inside its image: corners are pixels from the image's
/// top left corner, so none is negative and none is past the size.
fn placement_problems(b: &AnnotatedBox, size: Option<(u32, u32)>) -> Vec<String> {
    let mut problems = Vec::new();
    let corners = [b.x_min, b.y_min, b.x_max, b.y_max];
    if corners.iter().any(|c| !c.is_finite()) {
        problems.push(format!(
            "{} has a coordinate that is not a finite number",
            describe(b)
        ));
        return problems;
    }
    let negative: Vec<String> = ["x_min", "y_min", "x_max", "y_max"]
        .iter()
        .zip(corners)
        .filter(|(_, value)| *value < 0.0)
        .map(|(name, value)| format!("{name} {value}"))
        .collect();
    if !negative.is_empty() {
        problems.push(format!(
            "{} has {} ({}): coordinates are pixels from the image's top left corner",
            describe(b),
            if negative.len() == 1 {
                "a negative coordinate"
            } else {
                "negative coordinates"
            },
            negative.join(", ")
        ));
    }
    if let Some((width, height)) = size {
        if b.x_max > f64::from(width) {
            problems.push(format!(
                "{} goes past the image's right edge (x_max {} > width {width})",
                describe(b),
                b.x_max
            ));
        }
        if b.y_max > f64::from(height) {
            problems.push(format!(
                "{} goes past the image's bottom edge (y_max {} > height {height})",
                describe(b),
                b.y_max
            ));
        }
    }
    problems
}

/// Checks a box read from a file and returns it if it is sound, after
/// reporting each of its problems at `at`.
fn checked_box(
    file: &Path,
    b: AnnotatedBox,
    size: Option<(u32, u32)>,
    errors: &mut Errors,
) -> Option<AnnotatedBox> {
    let mut problems = extent_problems(&b);
    problems.extend(placement_problems(&b, size));
    if b.label.is_empty() {
        problems.push(format!("{} has an empty label", describe(&b)));
    }
    if problems.is_empty() {
        return Some(b);
    }
    for problem in problems {
        errors.add(file, Some(b.at.clone()), problem);
    }
    None
}

/// A box from its label and corners as written (VOC, CSV), checked.
fn box_from_text(
    file: &Path,
    at: Location,
    label: &str,
    written: [&str; 4],
    size: Option<(u32, u32)>,
    errors: &mut Errors,
) -> Option<AnnotatedBox> {
    match parse_corners(written, CORNERS) {
        Ok([x_min, y_min, x_max, y_max]) => {
            let b = AnnotatedBox {
                at,
                label: label.trim().to_owned(),
                x_min,
                y_min,
                x_max,
                y_max,
            };
            checked_box(file, b, size, errors)
        }
        Err(problems) => {
            for problem in problems {
                errors.add(file, Some(at.clone()), problem);
            }
            None
        }
    }
}

/// A stated image size must be a positive whole number of pixels each way.
fn parse_dimension(name: &str, text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err(format!("{name} is 0: a stated image size must be positive")),
        Ok(value) => Ok(value),
        Err(_) => Err(format!(
            "{name} {:?} is not a whole number of pixels",
            text.trim()
        )),
    }
}

// --- Pascal VOC ---

fn read_voc_dir(dir: &Path, errors: &mut Errors) -> Vec<AnnotatedImage> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.add(dir, None, format!("cannot list the directory: {e}"));
            return Vec::new();
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                if path.is_file() && has_extension(&path, "xml") {
                    files.push(path);
                }
            }
            Err(e) => errors.add(dir, None, format!("cannot list the directory: {e}")),
        }
    }
    if files.is_empty() {
        errors.add(
            dir,
            None,
            "no *.xml files here: a directory of Pascal VOC annotations holds one XML file per image",
        );
        return Vec::new();
    }
    files.sort();

    let mut images: Vec<AnnotatedImage> = Vec::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    for file in files {
        if errors.full() {
            break;
        }
        let Some(text) = read_text(&file, errors) else {
            continue;
        };
        let Some(image) = read_voc(&file, &text, errors) else {
            continue;
        };
        // One file per image keeps every box's place in one file; two files
        // for one image are most often a copy left behind.
        if let Some(&first) = by_path.get(&image.path) {
            let first = &images[first];
            let sizes = match (first.size, image.size) {
                (Some(a), Some(b)) if a != b => format!(
                    ", with another size ({}x{} there, {}x{} here)",
                    a.0, a.1, b.0, b.1
                ),
                _ => String::new(),
            };
            errors.add(
                &file,
                Some(image.at.clone()),
                format!(
                    "image {} is already annotated in {} ({}){sizes}: sieve reads one VOC file per image, so merge the two",
                    image.path,
                    first.file.display(),
                    first.at
                ),
            );
            continue;
        }
        by_path.insert(image.path.clone(), images.len());
        images.push(image);
    }
    images
}

/// The first child element named `name`.
fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// An element's text, trimmed (VOC files are usually indented).
fn text_of<'a>(node: roxmltree::Node<'a, '_>) -> &'a str {
    node.text().unwrap_or("").trim()
}

/// One VOC file: one image, or `None` after reporting what is wrong.
fn read_voc(file: &Path, text: &str, errors: &mut Errors) -> Option<AnnotatedImage> {
    let doc = match roxmltree::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            errors.add(
                file,
                Some(Location::Line(u64::from(e.pos().row))),
                format!("not well-formed XML: {e}"),
            );
            return None;
        }
    };
    let line =
        |node: roxmltree::Node| Location::Line(u64::from(doc.text_pos_at(node.range().start).row));
    let before = errors.list.len();

    let root = doc.root_element();
    if root.tag_name().name() != "annotation" {
        errors.add(
            file,
            Some(line(root)),
            format!(
                "the root element is <{}>, not <annotation>: not a Pascal VOC file",
                root.tag_name().name()
            ),
        );
        return None;
    }

    let filename = child(root, "filename");
    let at = filename.map_or_else(|| line(root), line);
    let path = match filename.map(text_of) {
        None => {
            errors.add(
                file,
                Some(at.clone()),
                "<annotation> has no <filename>: it names the image the boxes belong to",
            );
            String::new()
        }
        Some("") => {
            errors.add(file, Some(at.clone()), "<filename> is empty");
            String::new()
        }
        Some(path) => path.to_owned(),
    };

    let size = match child(root, "size") {
        None => None,
        Some(size) => {
            let mut dimensions = Vec::new();
            for name in ["width", "height"] {
                match child(size, name) {
                    None => errors.add(file, Some(line(size)), format!("<size> has no <{name}>")),
                    Some(node) => match parse_dimension(name, text_of(node)) {
                        Ok(value) => dimensions.push(value),
                        Err(problem) => errors.add(file, Some(line(node)), problem),
                    },
                }
            }
            match dimensions[..] {
                [width, height] => Some((width, height)),
                _ => None,
            }
        }
    };

    let mut boxes = Vec::new();
    for object in root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "object")
    {
        if errors.full() {
            break;
        }
        let box_at = line(object);
        let label = child(object, "name").map(text_of);
        if label.is_none() {
            errors.add(
                file,
                Some(box_at.clone()),
                "<object> has no <name>: it is the box's label",
            );
        }
        let Some(bndbox) = child(object, "bndbox") else {
            errors.add(file, Some(box_at), "<object> has no <bndbox>");
            continue;
        };
        let corners = CORNERS.map(|name| child(bndbox, name).map(text_of));
        let missing: Vec<String> = CORNERS
            .iter()
            .zip(&corners)
            .filter(|(_, corner)| corner.is_none())
            .map(|(name, _)| format!("<{name}>"))
            .collect();
        if !missing.is_empty() {
            errors.add(
                file,
                Some(box_at),
                format!("<bndbox> has no {}", missing.join(", ")),
            );
            continue;
        }
        let Some(label) = label else {
            continue;
        };
        let written = corners.map(|corner| corner.unwrap_or(""));
        if let Some(b) = box_from_text(file, box_at, label, written, size, errors) {
            boxes.push(b);
        }
    }

    if errors.list.len() > before {
        return None;
    }
    Some(AnnotatedImage {
        path,
        file: file.to_path_buf(),
        at,
        size,
        boxes,
    })
}

// --- CSV ---

/// The columns a CSV annotation file must have.
const CSV_COLUMNS: [&str; 6] = ["image_path", "xmin", "ymin", "xmax", "ymax", "label"];

fn read_csv(file: &Path, text: &str, errors: &mut Errors) -> Vec<AnnotatedImage> {
    let before = errors.list.len();
    // `lines` takes `\r\n` as well as `\n`; numbered before blank lines are
    // skipped, so that the numbers are the editor's.
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i as u64 + 1, line))
        .filter(|(_, line)| !line.trim().is_empty());
    let Some((header_line, header)) = lines.next() else {
        errors.add(
            file,
            None,
            format!(
                "the file is empty: a CSV annotation file starts with a header naming {}",
                CSV_COLUMNS.join(",")
            ),
        );
        return Vec::new();
    };
    let header = match split_csv(header) {
        Ok(header) => header,
        Err(problem) => {
            errors.add(
                file,
                Some(Location::Line(header_line)),
                format!("the header: {problem}"),
            );
            return Vec::new();
        }
    };
    let columns = CSV_COLUMNS.map(|name| header.iter().position(|h| h == name));
    let missing: Vec<&str> = CSV_COLUMNS
        .iter()
        .zip(&columns)
        .filter(|(_, column)| column.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        errors.add(
            file,
            Some(Location::Line(header_line)),
            format!(
                "the header has no column {}: it must name {} (it names {})",
                missing.join(", "),
                CSV_COLUMNS.join(","),
                header.join(",")
            ),
        );
        return Vec::new();
    }
    let [path_column, x_min, y_min, x_max, y_max, label_column] = columns.map(|c| c.unwrap_or(0));
    let needed = 1 + [path_column, x_min, y_min, x_max, y_max, label_column]
        .into_iter()
        .max()
        .unwrap_or(0);

    let mut images: Vec<AnnotatedImage> = Vec::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    for (line, text) in lines {
        if errors.full() {
            break;
        }
        let at = Location::Line(line);
        let fields = match split_csv(text) {
            Ok(fields) => fields,
            Err(problem) => {
                errors.add(file, Some(at), problem);
                continue;
            }
        };
        if fields.len() < needed {
            errors.add(
                file,
                Some(at),
                format!(
                    "the row has {} fields, the header {}",
                    fields.len(),
                    header.len()
                ),
            );
            continue;
        }
        let path = fields[path_column].as_str();
        if path.is_empty() {
            errors.add(file, Some(at), "image_path is empty");
            continue;
        }
        let index = *by_path.entry(path.to_owned()).or_insert_with(|| {
            images.push(AnnotatedImage {
                path: path.to_owned(),
                file: file.to_path_buf(),
                at: at.clone(),
                size: None,
                boxes: Vec::new(),
            });
            images.len() - 1
        });
        let written = [x_min, y_min, x_max, y_max].map(|column| fields[column].as_str());
        // deepforest's row for an image without trees: it names the image.
        if written.iter().all(|w| w.parse::<f64>() == Ok(0.0)) {
            continue;
        }
        if let Some(b) = box_from_text(file, at, &fields[label_column], written, None, errors) {
            images[index].boxes.push(b);
        }
    }
    if images.is_empty() && errors.list.len() == before {
        errors.add(file, None, "no images: the file has a header and no rows");
    }
    images
}

/// Splits one CSV line into trimmed fields. A field may be quoted with `"`
/// (`""` for a quote inside), as spreadsheets write names with commas; a
/// quoted field may not span lines, as in the ingest manifest (and so every
/// row has its own line number).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted => {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                }
            }
            '"' if field.trim().is_empty() => {
                field.clear();
                quoted = true;
            }
            ',' if !quoted => fields.push(std::mem::take(&mut field).trim().to_owned()),
            c => field.push(c),
        }
    }
    if quoted {
        return Err(
            "a quoted field is not closed on its line (a field may not span lines)".to_owned(),
        );
    }
    fields.push(field.trim().to_owned());
    Ok(fields)
}

// --- COCO JSON ---

/// How errors name a COCO entry: `images[3] (id 17)`, or `images[3]`.
fn entry(list: &str, index: usize, value: &Value) -> Location {
    match value.get("id") {
        Some(id) if !id.is_null() => Location::Entry(format!("{list}[{index}] (id {id})")),
        _ => Location::Entry(format!("{list}[{index}]")),
    }
}

/// A required, non-empty text field of a COCO entry; `purpose` (why it is
/// needed) ends the message when it is missing or empty.
fn coco_text(value: &Value, field: &str, purpose: &str) -> Result<String, String> {
    match value.get(field) {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Some(Value::String(_)) => Err(format!("{field} is empty{purpose}")),
        None | Some(Value::Null) => Err(format!("has no {field}{purpose}")),
        Some(other) => Err(format!("{field} {other} is not a string")),
    }
}

/// An integer field that is required, or what is wrong with it.
fn coco_id(value: &Value, name: &str) -> Result<i64, String> {
    match value.get(name) {
        None | Some(Value::Null) => Err(format!("has no {name}")),
        Some(id) => id
            .as_i64()
            .ok_or_else(|| format!("{name} {id} is not an integer")),
    }
}

/// `width` or `height` of a COCO image: `None` when it is not there.
fn coco_dimension(value: &Value, name: &str) -> Result<Option<u32>, String> {
    match value.get(name) {
        None | Some(Value::Null) => Ok(None),
        // Some tools write 640.0: take it as 640.
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.fract() == 0.0 && v > 0.0 && v <= f64::from(u32::MAX) => {
                Ok(Some(v as u32))
            }
            _ => Err(format!(
                "{name} {n} is not a positive whole number of pixels"
            )),
        },
        Some(other) => Err(format!("{name} {other} is not a number")),
    }
}

/// A top-level list of a COCO file; reports it missing.
fn coco_list<'a>(
    file: &Path,
    root: &'a Value,
    name: &str,
    errors: &mut Errors,
) -> Option<&'a Vec<Value>> {
    match root.get(name) {
        Some(Value::Array(list)) => Some(list),
        None => {
            errors.add(
                file,
                None,
                format!("no \"{name}\" list: a COCO file has \"images\", \"annotations\" and \"categories\""),
            );
            None
        }
        Some(_) => {
            errors.add(file, None, format!("\"{name}\" is not a list"));
            None
        }
    }
}

fn read_coco(file: &Path, text: &str, errors: &mut Errors) -> Vec<AnnotatedImage> {
    let before = errors.list.len();
    let root: Value = match serde_json::from_str(text) {
        Ok(root) => root,
        Err(e) => {
            errors.add(
                file,
                Some(Location::Line(e.line() as u64)),
                format!("not valid JSON: {e}"),
            );
            return Vec::new();
        }
    };
    if !root.is_object() {
        errors.add(
            file,
            None,
            "not a COCO file: the top level is not an object with \"images\", \"annotations\" and \"categories\"",
        );
        return Vec::new();
    }
    let image_list = coco_list(file, &root, "images", errors);
    let annotation_list = coco_list(file, &root, "annotations", errors);
    let category_list = coco_list(file, &root, "categories", errors);
    let (Some(image_list), Some(annotation_list), Some(category_list)) =
        (image_list, annotation_list, category_list)
    else {
        return Vec::new();
    };
    if image_list.is_empty() {
        errors.add(file, None, "no images: the \"images\" list is empty");
        return Vec::new();
    }

    let mut images: Vec<AnnotatedImage> = Vec::new();
    // An image id, and a file name (named twice, it is one image), to its
    // place in `images`.
    let mut by_id: HashMap<i64, usize> = HashMap::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    for (i, value) in image_list.iter().enumerate() {
        if errors.full() {
            break;
        }
        let at = entry("images", i, value);
        let mut add = |reason: String| errors.add(file, Some(at.clone()), reason);
        if !value.is_object() {
            add("is not an object".to_owned());
            continue;
        }
        let id = coco_id(value, "id").map_err(&mut add).ok();
        let path = coco_text(value, "file_name", ": it names the image")
            .map_err(&mut add)
            .ok();
        let width = coco_dimension(value, "width").map_err(&mut add);
        let height = coco_dimension(value, "height").map_err(&mut add);
        let size = match (width, height) {
            (Ok(Some(width)), Ok(Some(height))) => Some((width, height)),
            (Ok(Some(_)), Ok(None)) => {
                add("has a width but no height".to_owned());
                None
            }
            (Ok(None), Ok(Some(_))) => {
                add("has a height but no width".to_owned());
                None
            }
            _ => None,
        };
        let (Some(id), Some(path)) = (id, path) else {
            continue;
        };
        if let Some(&first) = by_id.get(&id) {
            add(format!("id {id} is already the id of {}", images[first].at));
            continue;
        }
        let index = match by_path.get(&path) {
            Some(&first) if images[first].size != size => {
                let show = |size: Option<(u32, u32)>| {
                    size.map_or("no size".to_owned(), |(w, h)| format!("{w}x{h}"))
                };
                add(format!(
                    "file_name {path} is named again with another size: {} here, {} in {}",
                    show(size),
                    show(images[first].size),
                    images[first].at
                ));
                continue;
            }
            Some(&first) => first,
            None => {
                by_path.insert(path.clone(), images.len());
                images.push(AnnotatedImage {
                    path,
                    file: file.to_path_buf(),
                    at,
                    size,
                    boxes: Vec::new(),
                });
                images.len() - 1
            }
        };
        by_id.insert(id, index);
    }

    let mut categories: HashMap<i64, String> = HashMap::new();
    for (i, value) in category_list.iter().enumerate() {
        if errors.full() {
            break;
        }
        let at = entry("categories", i, value);
        let mut add = |reason: String| errors.add(file, Some(at.clone()), reason);
        if !value.is_object() {
            add("is not an object".to_owned());
            continue;
        }
        let id = coco_id(value, "id").map_err(&mut add).ok();
        let name = coco_text(value, "name", ": it is the label of the category's boxes")
            .map_err(&mut add)
            .ok();
        let (Some(id), Some(name)) = (id, name) else {
            continue;
        };
        if categories.contains_key(&id) {
            add(format!("id {id} is already the id of another category"));
            continue;
        }
        categories.insert(id, name);
    }

    for (i, value) in annotation_list.iter().enumerate() {
        if errors.full() {
            break;
        }
        let at = entry("annotations", i, value);
        let mut add = |reason: String| errors.add(file, Some(at.clone()), reason);
        if !value.is_object() {
            add("is not an object".to_owned());
            continue;
        }
        let image = coco_id(value, "image_id")
            .map_err(&mut add)
            .ok()
            .and_then(|id| {
                let image = by_id.get(&id).copied();
                if image.is_none() {
                    add(format!("image_id {id} names no entry of \"images\""));
                }
                image
            });
        let label = coco_id(value, "category_id")
            .map_err(&mut add)
            .ok()
            .and_then(|id| {
                let label = categories.get(&id).cloned();
                if label.is_none() {
                    add(format!("category_id {id} names no entry of \"categories\""));
                }
                label
            });
        let bbox = match value.get("bbox") {
            None | Some(Value::Null) => {
                add("has no bbox: sieve imports boxes, [x, y, width, height]".to_owned());
                None
            }
            Some(written) => {
                let numbers: Option<Vec<f64>> = written
                    .as_array()
                    .and_then(|list| list.iter().map(Value::as_f64).collect());
                match numbers.as_deref() {
                    Some(&[x, y, w, h]) => Some([x, y, w, h]),
                    _ => {
                        add(format!(
                            "bbox {written} is not four numbers [x, y, width, height]"
                        ));
                        None
                    }
                }
            }
        };
        let (Some(index), Some(label), Some([x, y, w, h])) = (image, label, bbox) else {
            continue;
        };
        // COCO writes a width and a height; name them, not the corners
        // sieve computes from them.
        let mut problems = Vec::new();
        if w <= 0.0 {
            problems.push(format!(
                "bbox [{x}, {y}, {w}, {h}] of {label} has zero or negative width ({w})"
            ));
        }
        if h <= 0.0 {
            problems.push(format!(
                "bbox [{x}, {y}, {w}, {h}] of {label} has zero or negative height ({h})"
            ));
        }
        if !problems.is_empty() {
            for problem in problems {
                add(problem);
            }
            continue;
        }
        let b = AnnotatedBox {
            at: at.clone(),
            label,
            x_min: x,
            y_min: y,
            x_max: x + w,
            y_max: y + h,
        };
        let size = images[index].size;
        if let Some(b) = checked_box(file, b, size, errors) {
            images[index].boxes.push(b);
        }
    }

    if errors.list.len() > before {
        return Vec::new();
    }
    images
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write fixture");
        path
    }

    fn read_errors(path: &Path) -> Vec<AnnotationError> {
        match read(path) {
            Ok(images) => panic!("expected errors, read {images:?}"),
            Err(errors) => errors,
        }
    }

    /// The errors as (location, reason) pairs, for compact assertions.
    fn places(errors: &[AnnotationError]) -> Vec<(String, String)> {
        errors
            .iter()
            .map(|e| {
                (
                    e.at.as_ref().map_or(String::new(), ToString::to_string),
                    e.reason.clone(),
                )
            })
            .collect()
    }

    fn voc_file(filename: &str, size: Option<(u32, u32)>, objects: &[(&str, [&str; 4])]) -> String {
        let mut text =
            format!("<annotation>\n  <folder>RGB</folder>\n  <filename>{filename}</filename>\n");
        if let Some((w, h)) = size {
            text += &format!(
                "  <size>\n    <width>{w}</width>\n    <height>{h}</height>\n    <depth>3</depth>\n  </size>\n"
            );
        }
        for (name, [x0, y0, x1, y1]) in objects {
            text += &format!(
                "  <object>\n    <name>{name}</name>\n    <bndbox>\n      <xmin>{x0}</xmin>\n      <ymin>{y0}</ymin>\n      <xmax>{x1}</xmax>\n      <ymax>{y1}</ymax>\n    </bndbox>\n  </object>\n"
            );
        }
        text + "</annotation>\n"
    }

    #[test]
    fn reads_a_voc_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = voc_file(
            "OSBS_029.tif",
            Some((400, 400)),
            &[
                ("Tree", ["203", "67", "227", "90"]),
                ("Dead", ["1.5", "2", "400", "400.0"]),
            ],
        );
        let path = write(&dir, "OSBS_029.xml", &text);
        let (format, images) = read(&path).expect("reads");
        assert_eq!(format, AnnotationFormat::Voc);
        assert_eq!(format.name(), "voc");
        assert_eq!(images.len(), 1);
        let image = &images[0];
        assert_eq!(image.path, "OSBS_029.tif");
        assert_eq!(image.file, path);
        assert_eq!(image.at, Location::Line(3));
        assert_eq!(image.size, Some((400, 400)));
        assert_eq!(
            image.boxes,
            vec![
                AnnotatedBox {
                    at: Location::Line(9),
                    label: "Tree".into(),
                    x_min: 203.0,
                    y_min: 67.0,
                    x_max: 227.0,
                    y_max: 90.0,
                },
                AnnotatedBox {
                    at: Location::Line(18),
                    label: "Dead".into(),
                    x_min: 1.5,
                    y_min: 2.0,
                    x_max: 400.0,
                    y_max: 400.0,
                },
            ]
        );
    }

    #[test]
    fn a_voc_file_without_size_or_objects_is_an_image_with_no_boxes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "a.xml", &voc_file("empty.png", None, &[]));
        let (_, images) = read(&path).expect("reads");
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].size, None);
        assert!(images[0].boxes.is_empty());
    }

    #[test]
    fn reads_a_directory_of_voc_files_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            &dir,
            "b.xml",
            &voc_file("b.png", Some((10, 10)), &[("x", ["1", "1", "2", "2"])]),
        );
        write(&dir, "a.XML", &voc_file("a.png", Some((10, 10)), &[]));
        write(&dir, "notes.txt", "not an annotation");
        let (format, images) = read(dir.path()).expect("reads");
        assert_eq!(format, AnnotationFormat::Voc);
        let paths: Vec<_> = images.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["a.png", "b.png"]);
        assert_eq!(images[1].file, dir.path().join("b.xml"));
        assert_eq!(images[1].boxes.len(), 1);
    }

    #[test]
    fn voc_errors_are_all_reported_with_their_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = voc_file(
            "a.png",
            Some((100, 50)),
            &[
                ("tree", ["10", "20", "5", "40"]),   // line 9: zero width
                ("tree", ["abc", "20", "30", "40"]), // line 18: not a number
                ("tree", ["-3", "0", "101", "51"]),  // line 27: negative, past both edges
                ("", ["1", "2", "3", "4"]),          // line 36: empty label
                ("tree", ["1", "2", "3", "inf"]),    // line 45: not finite
            ],
        );
        let path = write(&dir, "a.xml", &text);
        let errors = read_errors(&path);
        assert_eq!(
            places(&errors),
            [
                ("line 9", "box 10,20,5,40 of tree has zero or negative width (x_max 5 <= x_min 10)"),
                ("line 18", "xmin \"abc\" is not a number"),
                ("line 27", "box -3,0,101,51 of tree has a negative coordinate (x_min -3): coordinates are pixels from the image's top left corner"),
                ("line 27", "box -3,0,101,51 of tree goes past the image's right edge (x_max 101 > width 100)"),
                ("line 27", "box -3,0,101,51 of tree goes past the image's bottom edge (y_max 51 > height 50)"),
                ("line 36", "box 1,2,3,4 has an empty label"),
                ("line 45", "ymax inf is not a finite number"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        assert_eq!(
            errors[0].to_string(),
            format!(
                "{}, line 9: box 10,20,5,40 of tree has zero or negative width (x_max 5 <= x_min 10)",
                path.display()
            )
        );
    }

    #[test]
    fn voc_missing_elements_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "<annotation>\n\
                    <size><width>10</width></size>\n\
                    <object>\n<bndbox><xmin>1</xmin><ymin>1</ymin></bndbox>\n</object>\n\
                    </annotation>\n";
        let errors = read_errors(&write(&dir, "a.xml", text));
        assert_eq!(
            places(&errors),
            [
                (
                    "line 1",
                    "<annotation> has no <filename>: it names the image the boxes belong to"
                ),
                ("line 2", "<size> has no <height>"),
                ("line 3", "<object> has no <name>: it is the box's label"),
                ("line 3", "<bndbox> has no <xmax>, <ymax>"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn voc_that_is_not_voc_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let errors = read_errors(&write(
            &dir,
            "a.xml",
            "<annotation>\n<filename>a.png\n</annotation>",
        ));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].at, Some(Location::Line(3)));
        assert!(
            errors[0].reason.starts_with("not well-formed XML"),
            "{}",
            errors[0]
        );

        let errors = read_errors(&write(&dir, "b.xml", "<svg/>"));
        assert_eq!(
            errors[0].reason,
            "the root element is <svg>, not <annotation>: not a Pascal VOC file"
        );

        let errors = read_errors(&write(
            &dir,
            "c.xml",
            "<annotation><filename>a.png</filename><size><width>0</width><height>x</height></size></annotation>",
        ));
        assert_eq!(
            places(&errors),
            [
                ("line 1", "width is 0: a stated image size must be positive"),
                ("line 1", "height \"x\" is not a whole number of pixels"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn one_image_in_two_voc_files_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir, "a.xml", &voc_file("same.png", Some((10, 10)), &[]));
        let second = write(&dir, "b.xml", &voc_file("same.png", Some((20, 10)), &[]));
        let errors = read_errors(dir.path());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, second);
        assert_eq!(errors[0].at, Some(Location::Line(3)));
        assert_eq!(
            errors[0].reason,
            format!(
                "image same.png is already annotated in {} (line 3), with another size (10x10 there, 20x10 here): sieve reads one VOC file per image, so merge the two",
                dir.path().join("a.xml").display()
            )
        );
    }

    #[test]
    fn a_directory_without_voc_files_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let errors = read_errors(dir.path());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].reason.starts_with("no *.xml files here"));
    }

    #[test]
    fn reads_csv_grouping_rows_by_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "boxes.csv",
            "\u{feff}score,label,image_path,xmin,ymin,xmax,ymax\n\
             0.9,Tree,a.png,1,2,3,4\n\
             0.8,Tree,b.png,0,0,0,0\n\
             0.7, Dead ,a.png,5.5,6,7,8.25\n\
             \n\
             0.1,Tree,c.png,10,10,20,20\n",
        );
        let (format, images) = read(&path).expect("reads");
        assert_eq!(format, AnnotationFormat::Csv);
        let summary: Vec<_> = images
            .iter()
            .map(|i| (i.path.as_str(), i.at.clone(), i.size, i.boxes.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a.png", Location::Line(2), None, 2),
                ("b.png", Location::Line(3), None, 0),
                ("c.png", Location::Line(6), None, 1),
            ]
        );
        assert_eq!(
            images[0].boxes[1],
            AnnotatedBox {
                at: Location::Line(4),
                label: "Dead".into(),
                x_min: 5.5,
                y_min: 6.0,
                x_max: 7.0,
                y_max: 8.25,
            }
        );
    }

    #[test]
    fn reads_csv_with_windows_line_ends_and_quoted_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "boxes.csv",
            "image_path,xmin,ymin,xmax,ymax,label\r\n\r\n\
             \"photos/a, b.png\",1,2,3,4,\"tree \"\"oak\"\"\"\r\n\
             a.png,1,2,3,\"4\r\n",
        );
        let errors = read_errors(&path);
        assert_eq!(
            places(&errors),
            [(
                "line 4".to_owned(),
                "a quoted field is not closed on its line (a field may not span lines)".to_owned()
            )]
        );
        let path = write(
            &dir,
            "boxes.csv",
            "image_path,xmin,ymin,xmax,ymax,label\r\n\r\n\
             \"photos/a, b.png\",1,2,3,4,\"tree \"\"oak\"\"\"\r\n",
        );
        let (_, images) = read(&path).expect("reads");
        assert_eq!(images[0].path, "photos/a, b.png");
        assert_eq!(images[0].at, Location::Line(3));
        assert_eq!(images[0].boxes[0].label, "tree \"oak\"");
    }

    #[test]
    fn csv_errors_are_all_reported_with_their_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "boxes.csv",
            "image_path,xmin,ymin,xmax,ymax,label\n\
             a.png,10,20,5,40,tree\n\
             a.png,1,2,3\n\
             ,1,2,3,4,tree\n\
             a.png,1,two,3,4,tree\n\
             a.png,1,2,3,4,\n\
             a.png,1,5,3,4,tree\n",
        );
        let errors = read_errors(&path);
        assert_eq!(
            places(&errors),
            [
                (
                    "line 2",
                    "box 10,20,5,40 of tree has zero or negative width (x_max 5 <= x_min 10)"
                ),
                ("line 3", "the row has 4 fields, the header 6"),
                ("line 4", "image_path is empty"),
                ("line 5", "ymin \"two\" is not a number"),
                ("line 6", "box 1,2,3,4 has an empty label"),
                (
                    "line 7",
                    "box 1,5,3,4 of tree has zero or negative height (y_max 4 <= y_min 5)"
                ),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn csv_without_the_columns_or_rows_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let errors = read_errors(&write(
            &dir,
            "a.csv",
            "path,xmin,ymin,x2,ymax\na.png,1,2,3,4\n",
        ));
        assert_eq!(
            places(&errors),
            [(
                "line 1".to_owned(),
                "the header has no column image_path, xmax, label: it must name \
                 image_path,xmin,ymin,xmax,ymax,label (it names path,xmin,ymin,x2,ymax)"
                    .to_owned()
            )]
        );
        let errors = read_errors(&write(
            &dir,
            "b.csv",
            "image_path,xmin,ymin,xmax,ymax,label\n",
        ));
        assert_eq!(
            places(&errors),
            [(
                String::new(),
                "no images: the file has a header and no rows".to_owned()
            )]
        );
        let errors = read_errors(&write(&dir, "c.csv", ""));
        assert!(
            errors[0].reason.starts_with("the file is empty"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn reads_coco_with_an_image_without_annotations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "coco.json",
            r#"{
                "images": [
                    {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
                    {"id": 2, "file_name": "empty.jpg", "width": 640.0, "height": 480},
                    {"id": 3, "file_name": "nosize.jpg"}
                ],
                "annotations": [
                    {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 20, 30.5, 40]},
                    {"id": 11, "image_id": 3, "category_id": 8, "bbox": [0, 0, 5, 5], "iscrowd": 0}
                ],
                "categories": [{"id": 7, "name": "Tree"}, {"id": 8, "name": "Bird"}]
            }"#,
        );
        let (format, images) = read(&path).expect("reads");
        assert_eq!(format, AnnotationFormat::Coco);
        assert_eq!(images.len(), 3);
        assert_eq!(images[0].path, "a.jpg");
        assert_eq!(images[0].at, Location::Entry("images[0] (id 1)".into()));
        assert_eq!(images[0].size, Some((640, 480)));
        assert_eq!(
            images[0].boxes,
            vec![AnnotatedBox {
                at: Location::Entry("annotations[0] (id 10)".into()),
                label: "Tree".into(),
                x_min: 10.0,
                y_min: 20.0,
                x_max: 40.5,
                y_max: 60.0,
            }]
        );
        assert_eq!(images[1].path, "empty.jpg");
        assert_eq!(images[1].size, Some((640, 480)));
        assert!(images[1].boxes.is_empty());
        assert_eq!(images[2].size, None);
        assert_eq!(images[2].boxes[0].label, "Bird");
    }

    #[test]
    fn coco_errors_are_all_reported_with_their_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "coco.json",
            r#"{
                "images": [
                    {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                    {"id": 2, "file_name": "a.jpg", "width": 200, "height": 50},
                    {"id": 3, "width": 10, "height": 10}
                ],
                "annotations": [
                    {"id": 10, "image_id": 99, "category_id": 7, "bbox": [1, 1, 2, 2]},
                    {"id": 11, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2]},
                    {"id": 12, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 2]},
                    {"id": 13, "image_id": 1, "category_id": 7, "bbox": [90, 1, 20, 2]},
                    {"image_id": 1, "category_id": 7, "bbox": [1, 1, "2"]},
                    {"id": 15, "image_id": 1, "category_id": 6, "bbox": [1, 1, 2, 2]}
                ],
                "categories": [{"id": 7, "name": "tree"}, {"id": 6, "name": " "}]
            }"#,
        );
        let errors = read_errors(&path);
        assert_eq!(
            places(&errors),
            [
                ("images[1] (id 2)", "file_name a.jpg is named again with another size: 200x50 here, 100x50 in images[0] (id 1)"),
                ("images[2] (id 3)", "has no file_name: it names the image"),
                ("categories[1] (id 6)", "name is empty: it is the label of the category's boxes"),
                ("annotations[0] (id 10)", "image_id 99 names no entry of \"images\""),
                ("annotations[1] (id 11)", "category_id 5 names no entry of \"categories\""),
                ("annotations[2] (id 12)", "bbox [1, 1, 0, 2] of tree has zero or negative width (0)"),
                ("annotations[3] (id 13)", "box 90,1,110,3 of tree goes past the image's right edge (x_max 110 > width 100)"),
                ("annotations[4]", "bbox [1,1,\"2\"] is not four numbers [x, y, width, height]"),
                ("annotations[5] (id 15)", "category_id 6 names no entry of \"categories\""),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn coco_without_its_lists_or_images_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let errors = read_errors(&write(&dir, "a.json", r#"{"images": []}"#));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].reason.starts_with("no \"annotations\" list"));
        assert!(errors[1].reason.starts_with("no \"categories\" list"));

        let errors = read_errors(&write(
            &dir,
            "b.json",
            r#"{"images": [], "annotations": [], "categories": []}"#,
        ));
        assert_eq!(errors[0].reason, "no images: the \"images\" list is empty");

        let errors = read_errors(&write(&dir, "c.json", "{\n\"images\": [,]}"));
        assert_eq!(errors[0].at, Some(Location::Line(2)));
        assert!(errors[0].reason.starts_with("not valid JSON"));
    }

    #[test]
    fn other_files_are_refused_with_the_formats_sieve_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "boxes.txt", "");
        let errors = read_errors(&path);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            format!("{}: {FORMATS}", path.display())
        );

        let errors = read_errors(&dir.path().join("missing.csv"));
        assert!(
            errors[0].reason.starts_with("cannot read the file"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn reading_stops_after_max_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = "image_path,xmin,ymin,xmax,ymax,label\n".to_owned();
        for _ in 0..150 {
            text += "a.png,5,5,1,1,tree\n";
        }
        let errors = read_errors(&write(&dir, "a.csv", &text));
        // Each row has two problems: width and height.
        assert_eq!(errors.len(), MAX_ERRORS + 1);
        assert_eq!(errors[MAX_ERRORS - 1].at, Some(Location::Line(51)));
        assert!(
            errors[MAX_ERRORS]
                .reason
                .starts_with("reading stopped after 100 errors")
        );
    }

    #[test]
    fn check_box_names_every_problem() {
        let b = AnnotatedBox {
            at: Location::Line(2),
            label: "tree".into(),
            x_min: 10.0,
            y_min: 20.0,
            x_max: 30.0,
            y_max: 40.0,
        };
        assert_eq!(check_box(&b, 30, 40), Ok(()));
        assert_eq!(
            check_box(&b, 29, 39),
            Err(
                "box 10,20,30,40 of tree goes past the image's right edge (x_max 30 > width 29); \
                 box 10,20,30,40 of tree goes past the image's bottom edge (y_max 40 > height 39)"
                    .to_owned()
            )
        );
        let swapped = AnnotatedBox {
            x_min: 30.0,
            x_max: 10.0,
            ..b
        };
        assert_eq!(
            check_box(&swapped, 100, 100),
            Err(
                "box 30,20,10,40 of tree has zero or negative width (x_max 10 <= x_min 30)"
                    .to_owned()
            )
        );
    }
}
