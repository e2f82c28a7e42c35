//! How an entry is named: its linkage name, its name, or where its
//! abstract origin or specification leads, possibly into another unit; by
//! addr2line's rules (0.27), so names match what it gives.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use addr2line::gimli;

/// DWARF read from a mapped file.
pub(super) type Slice<'a> = gimli::EndianSlice<'a, gimli::RunTimeEndian>;

/// How deep a name is looked for through abstract origins (as addr2line).
const NAME_DEPTH: usize = 16;

/// The attributes that name an entry, kept as read so that only the
/// entries on a stack have their abstract origins followed (often into
/// other units): a function's body has thousands of inlined calls.
#[derive(Debug, Clone, Default)]
pub(super) struct Naming<'a> {
    linkage: Option<Slice<'a>>,
    name: Option<Slice<'a>>,
    origin: Option<gimli::AttributeValue<Slice<'a>>>,
    /// The origin came before any `DW_AT_name`.
    origin_first: bool,
}

impl<'a> Naming<'a> {
    /// Reads one attribute if it names; says whether it did.
    pub(super) fn read(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        attr: &gimli::Attribute<Slice<'a>>,
    ) -> bool {
        match attr.name() {
            gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                if let Ok(value) = unit.attr_string(attr.value()) {
                    self.linkage = Some(value);
                }
            }
            gimli::DW_AT_name => {
                if self.name.is_none() {
                    self.name = unit.attr_string(attr.value()).ok();
                }
            }
            gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                if self.origin.is_none() {
                    self.origin_first = self.name.is_none();
                    self.origin = Some(attr.value());
                }
            }
            _ => return false,
        }
        true
    }

    /// The name addr2line gives: the linkage name; else whichever of the
    /// name and the origin's name came first and exists.
    pub(super) fn resolve(
        &self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        others: &mut OtherUnits<'_, 'a>,
    ) -> Option<Slice<'a>> {
        if self.linkage.is_some() {
            return self.linkage;
        }
        let origin = |others: &mut OtherUnits<'_, 'a>| {
            self.origin
                .and_then(|value| others.name(unit, value, NAME_DEPTH))
        };
        if self.origin_first {
            origin(others).or(self.name)
        } else {
            self.name.or_else(|| origin(others))
        }
    }
}

/// Units reached through references, read on demand for one naming: only
/// their header and abbreviations (a whole parse, with the root entry and
/// the line-program header, cost about 60 µs a unit and a cold stack
/// reaches three dozen of them), unless a name needs the unit's string
/// offsets.
pub(super) struct OtherUnits<'d, 'a> {
    dwarf: &'d gimli::Dwarf<Slice<'a>>,
    offsets: &'d [usize],
    light: HashMap<usize, Option<Rc<Light<'a>>>>,
    parsed: HashMap<usize, Option<Rc<gimli::Unit<Slice<'a>>>>>,
}

/// A unit's header and abbreviations.
type Light<'a> = (gimli::UnitHeader<Slice<'a>>, Arc<gimli::Abbreviations>);

/// A name that only a whole parse of its unit can read (`DW_FORM_strx`).
struct NeedsUnit;

impl<'d, 'a> OtherUnits<'d, 'a> {
    pub(super) fn new(dwarf: &'d gimli::Dwarf<Slice<'a>>, offsets: &'d [usize]) -> Self {
        Self {
            dwarf,
            offsets,
            light: HashMap::new(),
            parsed: HashMap::new(),
        }
    }

    /// The name an abstract origin or specification points to.
    pub(super) fn name(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        value: gimli::AttributeValue<Slice<'a>>,
        depth: usize,
    ) -> Option<Slice<'a>> {
        if depth == 0 {
            return None;
        }
        match value {
            gimli::AttributeValue::UnitRef(at) => self.name_at(unit, at, depth),
            gimli::AttributeValue::DebugInfoRef(gimli::DebugInfoOffset(target)) => {
                self.name_elsewhere(target, depth)
            }
            _ => None,
        }
    }

    /// The name at `target` in `.debug_info`, in whichever unit holds it.
    fn name_elsewhere(&mut self, target: usize, depth: usize) -> Option<Slice<'a>> {
        let start = *self.offsets.get(
            self.offsets
                .partition_point(|o| *o <= target)
                .checked_sub(1)?,
        )?;
        let dwarf = self.dwarf;
        let light = self
            .light
            .entry(start)
            .or_insert_with(|| {
                let header = dwarf
                    .debug_info
                    .header_from_offset(gimli::DebugInfoOffset(start))
                    .ok()?;
                let abbreviations = dwarf.abbreviations(&header).ok()?;
                Some(Rc::new((header, abbreviations)))
            })
            .clone()?;
        let at = gimli::DebugInfoOffset(target).to_unit_offset(&light.0)?;
        if let Ok(name) = self.name_light(&light, at, depth) {
            return name;
        }
        let other = self
            .parsed
            .entry(start)
            .or_insert_with(|| dwarf.unit(light.0).ok().map(Rc::new))
            .clone()?;
        self.name_at(gimli::UnitRef::new(dwarf, &other), at, depth)
    }

    /// [`OtherUnits::name_at`] from a unit's header and abbreviations.
    fn name_light(
        &mut self,
        light: &Rc<Light<'a>>,
        at: gimli::UnitOffset,
        depth: usize,
    ) -> Result<Option<Slice<'a>>, NeedsUnit> {
        let (header, abbreviations) = &**light;
        let Ok(mut entries) = header.entries_raw(abbreviations, Some(at)) else {
            return Ok(None);
        };
        let Ok(Some(abbrev)) = entries.read_abbreviation() else {
            return Ok(None);
        };
        let mut name = None;
        let mut next = None;
        for spec in abbrev.attributes() {
            let Ok(attr) = entries.read_attribute(*spec) else {
                return Ok(None);
            };
            match attr.name() {
                gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                    if let Some(value) = self.string(attr.value())? {
                        return Ok(Some(value));
                    }
                }
                gimli::DW_AT_name => {
                    if let Some(value) = self.string(attr.value())? {
                        name = Some(value);
                    }
                }
                gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                    next = Some(attr.value());
                }
                _ => {}
            }
        }
        if name.is_some() {
            return Ok(name);
        }
        // As `name(…, depth - 1)`.
        if depth <= 1 {
            return Ok(None);
        }
        Ok(match next {
            Some(gimli::AttributeValue::UnitRef(at)) => self.name_light(light, at, depth - 1)?,
            Some(gimli::AttributeValue::DebugInfoRef(gimli::DebugInfoOffset(target))) => {
                self.name_elsewhere(target, depth - 1)
            }
            _ => None,
        })
    }

    /// A string attribute, as `Dwarf::attr_string` reads it (`None` for a
    /// value that is not a string), for the forms that need no unit.
    fn string(
        &self,
        value: gimli::AttributeValue<Slice<'a>>,
    ) -> Result<Option<Slice<'a>>, NeedsUnit> {
        Ok(match value {
            gimli::AttributeValue::String(string) => Some(string),
            gimli::AttributeValue::DebugStrRef(at) => self.dwarf.debug_str.get_str(at).ok(),
            gimli::AttributeValue::DebugLineStrRef(at) => {
                self.dwarf.debug_line_str.get_str(at).ok()
            }
            gimli::AttributeValue::DebugStrOffsetsIndex(_) => return Err(NeedsUnit),
            _ => None,
        })
    }

    /// addr2line's `name_entry`: the linkage name, else the name, else
    /// where the abstract origin or specification leads.
    fn name_at(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        at: gimli::UnitOffset,
        depth: usize,
    ) -> Option<Slice<'a>> {
        let mut entries = unit.entries_raw(Some(at)).ok()?;
        let abbrev = entries.read_abbreviation().ok()??;
        let mut name = None;
        let mut next = None;
        for spec in abbrev.attributes() {
            let attr = entries.read_attribute(*spec).ok()?;
            match attr.name() {
                gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                    if let Ok(value) = unit.attr_string(attr.value()) {
                        return Some(value);
                    }
                }
                gimli::DW_AT_name => {
                    if let Ok(value) = unit.attr_string(attr.value()) {
                        name = Some(value);
                    }
                }
                gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                    next = Some(attr.value());
                }
                _ => {}
            }
        }
        if name.is_some() {
            return name;
        }
        self.name(unit, next?, depth - 1)
    }
}
