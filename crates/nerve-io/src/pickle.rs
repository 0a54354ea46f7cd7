//! A restricted unpickler for PyTorch checkpoints.
//!
//! `torch.save` writes Python pickles. A pickle is a program for a small stack machine whose
//! `GLOBAL` + `REDUCE` opcodes can import and call any Python function, which is why loading
//! an untrusted `.pt` file with `pickle` runs arbitrary code. This machine runs the same
//! opcodes (protocols 0–5, the binary forms and the few text forms torch files use) but
//! resolves globals against a short allow-list — `collections.OrderedDict`, the
//! `torch._utils._rebuild_*` functions that rebuild tensors and parameters, the
//! `torch.*Storage` classes, torch dtypes, `torch.Size`, `set`/`frozenset` and
//! `_codecs.encode` — and refuses every other global by name (`refused global os.system`).
//! Nothing is ever executed: `REDUCE` on an allowed global builds the value that global
//! would have built, described as data.
//!
//! Tensors come out as [`TensorSpec`]s (storage, offset, size, stride), not as data: the
//! bytes live outside the pickle (zip records, or after it in legacy files) and
//! [`crate::torch`] reads them. The result is a [`Value`] tree.
//!
//! Hostile input is bounded by [`Limits`]: stack, memo, object and container sizes, the
//! depth and size of the tree produced, and every length is checked against the bytes left
//! before anything is allocated.
//!
//! ```
//! use nerve_io::pickle::{unpickle, Limits, Value};
//! // pickle.dumps({"a": 1}, protocol=2)
//! let bytes = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.";
//! let out = unpickle(bytes, &Limits::default(), "inline".as_ref()).unwrap();
//! assert!(matches!(out.value.get("a"), Some(Value::Int(1))));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use nerve_core::{DType, Tensor};

use crate::FormatError;

/// Bounds on what one pickle may make the reader build. The defaults are far above what
/// any real checkpoint needs and far below what would exhaust the machine.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most values on the pickle stack at once.
    pub max_stack: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Most objects (every pushed value counts) one pickle may create.
    pub max_objects: usize,
    /// Most items in one tuple, list, set or dict.
    pub max_container_len: usize,
    /// Deepest nesting of containers in the result.
    pub max_depth: usize,
    /// Most nodes in the result tree (shared objects count once per place they appear).
    pub max_tree_nodes: usize,
    /// Most string and bytes payload in the result tree, counted per place, in bytes.
    pub max_tree_bytes: usize,
    /// Highest tensor rank accepted.
    pub max_rank: usize,
    /// Most elements a tensor may have beyond its storage's (a stride-0 "expanded" view is
    /// copied out in full; this bounds what a tiny hostile file can make us allocate).
    pub max_expanded_numel: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stack: 1 << 20,
            max_memo: 1 << 22,
            max_objects: 1 << 23,
            max_container_len: 1 << 24,
            max_depth: 200,
            max_tree_nodes: 1 << 22,
            max_tree_bytes: 1 << 30,
            max_rank: 64,
            max_expanded_numel: 1 << 26,
        }
    }
}

/// The element type of a torch storage class (`torch.FloatStorage`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageType {
    /// `FloatStorage`, float32.
    Float,
    /// `DoubleStorage`, float64.
    Double,
    /// `HalfStorage`, float16.
    Half,
    /// `BFloat16Storage`, bfloat16.
    BFloat16,
    /// `LongStorage`, int64.
    Long,
    /// `IntStorage`, int32.
    Int,
    /// `ShortStorage`, int16.
    Short,
    /// `CharStorage`, int8.
    Char,
    /// `ByteStorage`, uint8.
    Byte,
    /// `BoolStorage`, bool (one byte).
    Bool,
    /// `UntypedStorage`, raw bytes (read as uint8).
    Untyped,
}

impl StorageType {
    const ALL: [StorageType; 11] = [
        StorageType::Float,
        StorageType::Double,
        StorageType::Half,
        StorageType::BFloat16,
        StorageType::Long,
        StorageType::Int,
        StorageType::Short,
        StorageType::Char,
        StorageType::Byte,
        StorageType::Bool,
        StorageType::Untyped,
    ];

    /// The storage class's name in the `torch` module, e.g. `FloatStorage`.
    pub fn class_name(self) -> &'static str {
        match self {
            StorageType::Float => "FloatStorage",
            StorageType::Double => "DoubleStorage",
            StorageType::Half => "HalfStorage",
            StorageType::BFloat16 => "BFloat16Storage",
            StorageType::Long => "LongStorage",
            StorageType::Int => "IntStorage",
            StorageType::Short => "ShortStorage",
            StorageType::Char => "CharStorage",
            StorageType::Byte => "ByteStorage",
            StorageType::Bool => "BoolStorage",
            StorageType::Untyped => "UntypedStorage",
        }
    }

    /// The torch dtype's name, e.g. `torch.float32`.
    pub fn torch_dtype(self) -> &'static str {
        match self {
            StorageType::Float => "torch.float32",
            StorageType::Double => "torch.float64",
            StorageType::Half => "torch.float16",
            StorageType::BFloat16 => "torch.bfloat16",
            StorageType::Long => "torch.int64",
            StorageType::Int => "torch.int32",
            StorageType::Short => "torch.int16",
            StorageType::Char => "torch.int8",
            StorageType::Byte | StorageType::Untyped => "torch.uint8",
            StorageType::Bool => "torch.bool",
        }
    }

    /// Bytes per element in the file.
    pub fn element_size(self) -> usize {
        match self {
            StorageType::Double | StorageType::Long => 8,
            StorageType::Float | StorageType::Int => 4,
            StorageType::Half | StorageType::BFloat16 | StorageType::Short => 2,
            StorageType::Char | StorageType::Byte | StorageType::Bool | StorageType::Untyped => 1,
        }
    }

    /// The nerve dtype a tensor of this storage loads as: floats and bool keep their type,
    /// every integer type widens to `I64`.
    pub fn dtype(self) -> DType {
        match self {
            StorageType::Float => DType::F32,
            StorageType::Double => DType::F64,
            StorageType::Half => DType::F16,
            StorageType::BFloat16 => DType::BF16,
            StorageType::Bool => DType::Bool,
            StorageType::Long
            | StorageType::Int
            | StorageType::Short
            | StorageType::Char
            | StorageType::Byte
            | StorageType::Untyped => DType::I64,
        }
    }

    fn from_class_name(name: &str) -> Option<StorageType> {
        StorageType::ALL
            .into_iter()
            .find(|t| t.class_name() == name)
    }

    fn from_dtype_name(name: &str) -> Option<StorageType> {
        Some(match name {
            "float32" | "float" => StorageType::Float,
            "float64" | "double" => StorageType::Double,
            "float16" | "half" => StorageType::Half,
            "bfloat16" => StorageType::BFloat16,
            "int64" | "long" => StorageType::Long,
            "int32" | "int" => StorageType::Int,
            "int16" | "short" => StorageType::Short,
            "int8" => StorageType::Char,
            "uint8" => StorageType::Byte,
            "bool" => StorageType::Bool,
            _ => return None,
        })
    }
}

/// A Python global on the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `builtins.set`.
    Set,
    /// `builtins.frozenset`.
    FrozenSet,
    /// `_codecs.encode`, how protocol-2 pickles write `bytes` objects.
    CodecsEncode,
    /// `torch.Size`, read as a tuple.
    TorchSize,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor` (old files).
    RebuildTensor,
    /// `torch._utils._rebuild_parameter`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`.
    RebuildParameterWithState,
    /// A storage class, `torch.FloatStorage` and kin (also `torch.cuda.*Storage`).
    Storage(StorageType),
    /// A dtype object, `torch.float32` and kin.
    Dtype(StorageType),
}

impl Global {
    /// Resolve `module.name` against the allow-list.
    pub fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("builtins" | "__builtin__", "set") => Global::Set,
            ("builtins" | "__builtin__", "frozenset") => Global::FrozenSet,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("torch", "Size") => Global::TorchSize,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", n) => match StorageType::from_class_name(n) {
                Some(t) => Global::Storage(t),
                None => Global::Dtype(StorageType::from_dtype_name(n)?),
            },
            // Checkpoints saved from GPU tensors by old torch name the CUDA storage classes.
            ("torch.cuda", n) => match StorageType::from_class_name(n)? {
                StorageType::Untyped => return None,
                t => Global::Storage(t),
            },
            _ => return None,
        })
    }
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Global::OrderedDict => f.write_str("collections.OrderedDict"),
            Global::Set => f.write_str("builtins.set"),
            Global::FrozenSet => f.write_str("builtins.frozenset"),
            Global::CodecsEncode => f.write_str("_codecs.encode"),
            Global::TorchSize => f.write_str("torch.Size"),
            Global::RebuildTensorV2 => f.write_str("torch._utils._rebuild_tensor_v2"),
            Global::RebuildTensor => f.write_str("torch._utils._rebuild_tensor"),
            Global::RebuildParameter => f.write_str("torch._utils._rebuild_parameter"),
            Global::RebuildParameterWithState => {
                f.write_str("torch._utils._rebuild_parameter_with_state")
            }
            Global::Storage(t) => write!(f, "torch.{}", t.class_name()),
            Global::Dtype(t) => f.write_str(t.torch_dtype()),
        }
    }
}

/// A legacy storage view: elements `offset..offset + numel` of the root storage, under its
/// own key (files from torch before 1.6 can share one storage this way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageView {
    /// The view's own key.
    pub key: String,
    /// First element of the view in the root storage.
    pub offset: u64,
    /// Elements in the view.
    pub numel: u64,
}

/// A reference to a storage whose bytes live outside the pickle, as `persistent_load` gets
/// it: `('storage', torch.FloatStorage, key, location, numel[, view])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The root storage's key: `data/<key>` in a zip file, a storage id in a legacy file.
    pub key: String,
    /// The element type.
    pub storage_type: StorageType,
    /// Where it lived when saved (`cpu`, `cuda:0`); informational, everything loads on CPU.
    pub location: String,
    /// Elements in the root storage, as declared.
    pub numel: u64,
    /// Set when the reference is to a view of the root storage (legacy files only).
    pub view: Option<StorageView>,
}

impl StorageRef {
    /// First element of what the reference names (the view's start, or 0).
    pub fn base(&self) -> u64 {
        self.view.as_ref().map_or(0, |v| v.offset)
    }

    /// Elements in what the reference names (the view's size, or the storage's).
    pub fn len(&self) -> u64 {
        self.view.as_ref().map_or(self.numel, |v| v.numel)
    }

    /// Whether the referenced storage or view holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Which tensor of [`Unpickled::tensors`] this is; shared references and a parameter
    /// wrapping a tensor keep the index of the tensor they refer to.
    pub index: usize,
    /// The storage (or storage view) it reads.
    pub storage: StorageRef,
    /// First element, counted from the start of `storage`'s view.
    pub storage_offset: u64,
    /// The shape.
    pub size: Vec<u64>,
    /// Element strides, one per dimension.
    pub stride: Vec<u64>,
    /// `requires_grad` as saved.
    pub requires_grad: bool,
    /// Whether it was saved as an `nn.Parameter`.
    pub parameter: bool,
}

/// A dict (plain or `OrderedDict`) in insertion order, with the state a `BUILD` gave it
/// (a state_dict's `_metadata` lives there).
#[derive(Debug, Clone, Default)]
pub struct Dict {
    /// Key/value pairs in insertion order.
    pub items: Vec<(Value, Value)>,
    /// The object state set by `BUILD`, if any (for a state_dict: `{"_metadata": ...}`).
    pub state: Option<Box<Value>>,
}

impl Dict {
    /// The value under the string key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.items
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v)
    }
}

/// A value the unpickler produced.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// An integer outside i64, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// Bytes (also Python 2 strings that are not UTF-8, and `bytearray`).
    Bytes(Vec<u8>),
    /// A tuple (also `torch.Size`).
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A set or frozenset, items as listed.
    Set(Vec<Value>),
    /// A dict or OrderedDict.
    Dict(Dict),
    /// An allowed global that was referred to but not called (a dtype, a storage class).
    Global(Global),
    /// A storage, as referenced (its bytes are not read).
    Storage(Box<StorageRef>),
    /// A tensor as described by the pickle, not yet read.
    TensorRef(Box<TensorSpec>),
    /// A tensor read from the file (in trees returned by [`crate::torch::load_value`]).
    Tensor(Tensor),
}

impl Value {
    /// The entry under string key `key`, when this is a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => d.get(key),
            _ => None,
        }
    }

    /// The string, when this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, when this is one that fits in i64 (bools count as 0/1).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The loaded tensor, when this is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// A word for the kind of value, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Set(_) => "set",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::TensorRef(_) | Value::Tensor(_) => "tensor",
        }
    }
}

/// What one pickle produced.
#[derive(Debug, Clone)]
pub struct Unpickled {
    /// The pickled object.
    pub value: Value,
    /// Every tensor the pickle built, by [`TensorSpec::index`].
    pub tensors: Vec<TensorSpec>,
    /// Every root storage referenced, in order of first reference (views resolved to their
    /// root: key, type and declared element count).
    pub storages: Vec<StorageRef>,
    /// Bytes of input the pickle took, up to and including `STOP`.
    pub consumed: u64,
}

/// Unpickle one pickle from `bytes`. `path` names the source in errors.
pub fn unpickle(bytes: &[u8], limits: &Limits, path: &Path) -> Result<Unpickled, FormatError> {
    let mut src = Source::new(bytes, bytes.len() as u64);
    unpickle_from(&mut src, limits).map_err(|e| e.into_format(path, "pickle"))
}

// ------------------------------------------------------------------------------ internals

/// An error inside the machine, before the file's path is attached.
#[derive(Debug)]
pub(crate) enum PickleError {
    /// The bytes are wrong; `offset` is where the failing opcode starts.
    Invalid { offset: u64, msg: String },
    /// The reader failed.
    Io(std::io::Error),
}

impl PickleError {
    /// As a [`FormatError`] for `path`, saying which part of the file (`what`) was read.
    pub(crate) fn into_format(self, path: &Path, what: &str) -> FormatError {
        match self {
            PickleError::Invalid { offset, msg } => {
                FormatError::invalid(path, format!("{what}, byte {offset}: {msg}"))
            }
            PickleError::Io(source) => FormatError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// A reader that knows how many bytes remain, so lengths can be checked before allocating.
pub(crate) struct Source<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Source<R> {
    /// `len` bytes are available from `inner`.
    pub(crate) fn new(inner: R, len: u64) -> Self {
        Source { inner, pos: 0, len }
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn eof(&self, want: u64) -> PickleError {
        PickleError::Invalid {
            offset: self.pos,
            msg: format!(
                "unexpected end of data: {want} bytes needed, {} left",
                self.remaining()
            ),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), PickleError> {
        if buf.len() as u64 > self.remaining() {
            return Err(self.eof(buf.len() as u64));
        }
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.eof(buf.len() as u64))
            }
            Err(e) => Err(PickleError::Io(e)),
        }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut a = [0u8; N];
        self.fill(&mut a)?;
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    /// `n` bytes, refused before allocating when fewer remain.
    pub(crate) fn bytes(&mut self, n: u64) -> Result<Vec<u8>, PickleError> {
        if n > self.remaining() {
            return Err(self.eof(n));
        }
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v)?;
        Ok(v)
    }

    /// A newline-terminated line (without the newline), at most `max` bytes.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, PickleError> {
        let mut v = Vec::new();
        loop {
            let b = self.byte()?;
            if b == b'\n' {
                if v.last() == Some(&b'\r') {
                    v.pop();
                }
                return Ok(v);
            }
            if v.len() >= max {
                return Err(PickleError::Invalid {
                    offset: self.pos,
                    msg: format!("text line longer than {max} bytes"),
                });
            }
            v.push(b);
        }
    }
}

/// Longest text line (a GLOBAL's module or name, a text integer) accepted.
const MAX_LINE: usize = 1024;

/// A handle to an object in the machine's arena.
type H = usize;

/// Hashable dict keys, for the replace-on-duplicate rule of Python dicts.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Key {
    None,
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Default)]
struct DictObj {
    items: Vec<(H, H)>,
    index: HashMap<Key, usize>,
    state: Option<H>,
}

#[derive(Debug)]
enum Obj {
    /// Anything that holds no handles.
    Leaf(Value),
    Tuple(Vec<H>),
    List(Vec<H>),
    Set(Vec<H>),
    Dict(Box<DictObj>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Leaf(v) => v.kind(),
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Set(_) => "set",
            Obj::Dict(_) => "dict",
        }
    }
}

/// The name of an opcode, for messages.
fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// Decode a little-endian two's-complement integer (LONG1/LONG4 payload).
fn int_from_le(bytes: Vec<u8>) -> Value {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    if bytes.len() > 8 && bytes[8..].iter().any(|&b| b != fill) {
        return Value::BigInt(bytes);
    }
    let mut a = [fill; 8];
    let n = bytes.len().min(8);
    a[..n].copy_from_slice(&bytes[..n]);
    let v = i64::from_le_bytes(a);
    // Bytes past the eighth were all sign fill, but the eighth's sign bit must agree.
    if bytes.len() > 8 && (v < 0) != negative {
        return Value::BigInt(bytes);
    }
    Value::Int(v)
}

fn utf8(bytes: Vec<u8>, offset: u64) -> Result<String, PickleError> {
    String::from_utf8(bytes).map_err(|e| PickleError::Invalid {
        offset,
        msg: format!("string is not valid UTF-8 ({e})"),
    })
}

struct Machine<'a, R> {
    src: &'a mut Source<R>,
    limits: &'a Limits,
    objs: Vec<Obj>,
    stack: Vec<H>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, H>,
    tensors: Vec<TensorSpec>,
    storages: Vec<StorageRef>,
    storage_index: HashMap<String, usize>,
    /// Where the opcode being run starts.
    at: u64,
}

/// Run one pickle from `src`, leaving it positioned just after `STOP`.
pub(crate) fn unpickle_from<R: Read>(
    src: &mut Source<R>,
    limits: &Limits,
) -> Result<Unpickled, PickleError> {
    let start = src.pos();
    let mut m = Machine {
        src,
        limits,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        tensors: Vec::new(),
        storages: Vec::new(),
        storage_index: HashMap::new(),
        at: start,
    };
    let root = m.run()?;
    let mut budget = Budget {
        nodes: limits.max_tree_nodes,
        bytes: limits.max_tree_bytes,
    };
    let value = m.tree(root, 0, &mut budget)?;
    let consumed = m.src.pos() - start;
    Ok(Unpickled {
        value,
        tensors: m.tensors,
        storages: m.storages,
        consumed,
    })
}

struct Budget {
    nodes: usize,
    bytes: usize,
}

impl<R: Read> Machine<'_, R> {
    fn err(&self, msg: impl Into<String>) -> PickleError {
        PickleError::Invalid {
            offset: self.at,
            msg: msg.into(),
        }
    }

    fn alloc(&mut self, obj: Obj) -> Result<H, PickleError> {
        if self.objs.len() >= self.limits.max_objects {
            return Err(self.err(format!(
                "more than {} objects; refusing to build more",
                self.limits.max_objects
            )));
        }
        self.objs.push(obj);
        Ok(self.objs.len() - 1)
    }

    fn push_handle(&mut self, h: H) -> Result<(), PickleError> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(self.err(format!(
                "pickle stack deeper than {} values",
                self.limits.max_stack
            )));
        }
        self.stack.push(h);
        Ok(())
    }

    fn push(&mut self, obj: Obj) -> Result<(), PickleError> {
        let h = self.alloc(obj)?;
        self.push_handle(h)
    }

    fn push_value(&mut self, v: Value) -> Result<(), PickleError> {
        self.push(Obj::Leaf(v))
    }

    /// The lowest stack height the current mark allows popping to.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<H, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<H, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }

    /// The values pushed since the last MARK, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<H>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK to pop to"))?;
        if m > self.stack.len() {
            return Err(self.err("stack underflow below MARK"));
        }
        Ok(self.stack.split_off(m))
    }

    fn check_len(&self, n: usize, what: &str) -> Result<(), PickleError> {
        if n > self.limits.max_container_len {
            return Err(self.err(format!(
                "{what} of {n} items exceeds the limit of {}",
                self.limits.max_container_len
            )));
        }
        Ok(())
    }

    fn memo_put(&mut self, idx: u64) -> Result<(), PickleError> {
        let h = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&idx) {
            return Err(self.err(format!("memo larger than {} entries", self.limits.max_memo)));
        }
        self.memo.insert(idx, h);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<(), PickleError> {
        let h = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo entry {idx} is not set")))?;
        self.push_handle(h)
    }

    fn text_line(&mut self) -> Result<String, PickleError> {
        let at = self.src.pos();
        let line = self.src.line(MAX_LINE)?;
        utf8(line, at)
    }

    fn leaf(&self, h: H) -> Option<&Value> {
        match self.objs.get(h) {
            Some(Obj::Leaf(v)) => Some(v),
            _ => None,
        }
    }

    fn kind(&self, h: H) -> &'static str {
        self.objs.get(h).map_or("?", Obj::kind)
    }

    fn key_of(&self, h: H) -> Option<Key> {
        match self.leaf(h)? {
            Value::None => Some(Key::None),
            Value::Bool(b) => Some(Key::Int(*b as i64)),
            Value::Int(i) => Some(Key::Int(*i)),
            Value::Str(s) => Some(Key::Str(s.clone())),
            Value::Bytes(b) => Some(Key::Bytes(b.clone())),
            _ => None,
        }
    }

    fn set_items(&mut self, target: H, pairs: &[H]) -> Result<(), PickleError> {
        if !pairs.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        let keys: Vec<Option<Key>> = pairs.chunks(2).map(|p| self.key_of(p[0])).collect();
        let max = self.limits.max_container_len;
        let kind = self.kind(target);
        let Some(Obj::Dict(d)) = self.objs.get_mut(target) else {
            return Err(self.err(format!("SETITEM(S) on a {kind}, not a dict")));
        };
        for (pair, key) in pairs.chunks(2).zip(keys) {
            let (k, v) = (pair[0], pair[1]);
            match key {
                Some(key) => match d.index.get(&key) {
                    Some(&i) => d.items[i].1 = v,
                    None => {
                        d.index.insert(key, d.items.len());
                        d.items.push((k, v));
                    }
                },
                None => d.items.push((k, v)),
            }
            if d.items.len() > max {
                return Err(PickleError::Invalid {
                    offset: self.at,
                    msg: format!("dict of more than {max} items"),
                });
            }
        }
        Ok(())
    }

    fn extend(&mut self, target: H, items: Vec<H>, set: bool) -> Result<(), PickleError> {
        let max = self.limits.max_container_len;
        let kind = self.kind(target);
        let list = match self.objs.get_mut(target) {
            Some(Obj::List(l)) if !set => l,
            Some(Obj::Set(s)) if set => s,
            _ => {
                let op = if set { "ADDITEMS" } else { "APPEND(S)" };
                return Err(self.err(format!("{op} on a {kind}")));
            }
        };
        list.extend(items);
        if list.len() > max {
            return Err(self.err(format!("container of more than {max} items")));
        }
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match Global::resolve(module, name) {
            Some(g) => self.push_value(Value::Global(g)),
            None => Err(self.err(format!(
                "refused global {module}.{name}: not on the allow-list of a weights-only \
                 load (containers, tensors, storages); nothing in the file is executed"
            ))),
        }
    }

    fn run(&mut self) -> Result<H, PickleError> {
        loop {
            self.at = self.src.pos();
            let op = match self.src.byte() {
                Ok(op) => op,
                Err(PickleError::Invalid { .. }) => {
                    return Err(self.err("data ends before the pickle's STOP"))
                }
                Err(e) => return Err(e),
            };
            match op {
                b'.' => {
                    return self.pop().map_err(|_| self.err("STOP with an empty stack"));
                }
                0x80 => {
                    let p = self.src.byte()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    let n = u64::from_le_bytes(self.src.array()?);
                    if n > self.src.remaining() {
                        return Err(self.err(format!(
                            "FRAME of {n} bytes but only {} remain",
                            self.src.remaining()
                        )));
                    }
                }
                b'(' => {
                    if self.marks.len() >= self.limits.max_stack {
                        return Err(self.err("too many open MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let h = self.top()?;
                    self.push_handle(h)?;
                }
                // ---- constants and numbers
                b'N' => self.push_value(Value::None)?,
                0x88 => self.push_value(Value::Bool(true))?,
                0x89 => self.push_value(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.src.array()?);
                    self.push_value(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.src.byte()?;
                    self.push_value(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.src.array()?);
                    self.push_value(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.src.byte()? as u64;
                    let bytes = self.src.bytes(n)?;
                    self.push_value(int_from_le(bytes))?
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.src.array()?);
                    if n < 0 {
                        return Err(self.err(format!("LONG4 with negative length {n}")));
                    }
                    let bytes = self.src.bytes(n as u64)?;
                    self.push_value(int_from_le(bytes))?
                }
                b'I' => {
                    let s = self.text_line()?;
                    let v = match s.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => Value::Int(
                            t.parse()
                                .map_err(|_| self.err(format!("bad INT literal {t:?}")))?,
                        ),
                    };
                    self.push_value(v)?
                }
                b'L' => {
                    let s = self.text_line()?;
                    let t = s.strip_suffix('L').unwrap_or(&s);
                    let v: i64 = t.parse().map_err(|_| {
                        self.err(format!("LONG literal {t:?} is not an integer in i64 range"))
                    })?;
                    self.push_value(Value::Int(v))?
                }
                b'F' => {
                    let s = self.text_line()?;
                    let v: f64 = s
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("bad FLOAT literal {s:?}")))?;
                    self.push_value(Value::Float(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.src.array()?);
                    self.push_value(Value::Float(v))?
                }
                // ---- strings and bytes
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u32::from_le_bytes(self.src.array()?) as u64,
                        0x8c => self.src.byte()? as u64,
                        _ => u64::from_le_bytes(self.src.array()?),
                    };
                    let at = self.src.pos();
                    let bytes = self.src.bytes(n)?;
                    let s = utf8(bytes, at)?;
                    self.push_value(Value::Str(s))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = i32::from_le_bytes(self.src.array()?);
                        if n < 0 {
                            return Err(self.err(format!("BINSTRING with negative length {n}")));
                        }
                        n as u64
                    } else {
                        self.src.byte()? as u64
                    };
                    let bytes = self.src.bytes(n)?;
                    // Python 2 `str`: torch.load decodes it as UTF-8; keep other bytes as bytes.
                    let v = match String::from_utf8(bytes) {
                        Ok(s) => Value::Str(s),
                        Err(e) => Value::Bytes(e.into_bytes()),
                    };
                    self.push_value(v)?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => u32::from_le_bytes(self.src.array()?) as u64,
                        b'C' => self.src.byte()? as u64,
                        _ => u64::from_le_bytes(self.src.array()?),
                    };
                    let bytes = self.src.bytes(n)?;
                    self.push_value(Value::Bytes(bytes))?
                }
                // ---- containers
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.check_len(items.len(), "tuple")?;
                    self.push(Obj::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(items))?
                }
                b']' => self.push(Obj::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.check_len(items.len(), "list")?;
                    self.push(Obj::List(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.extend(target, vec![v], false)?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.extend(target, items, false)?
                }
                b'}' => self.push(Obj::Dict(Box::default()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let h = self.alloc(Obj::Dict(Box::default()))?;
                    self.set_items(h, &items)?;
                    self.push_handle(h)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, &[k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.set_items(target, &items)?
                }
                0x8f => self.push(Obj::Set(Vec::new()))?,
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.extend(target, items, true)?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.check_len(items.len(), "frozenset")?;
                    self.push(Obj::Set(items))?
                }
                // ---- memo
                b'q' => {
                    let i = self.src.byte()? as u64;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.src.array()?) as u64;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?
                }
                b'p' => {
                    let s = self.text_line()?;
                    let i = s
                        .parse()
                        .map_err(|_| self.err(format!("bad PUT index {s:?}")))?;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.src.byte()? as u64;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.src.array()?) as u64;
                    self.memo_get(i)?
                }
                b'g' => {
                    let s = self.text_line()?;
                    let i = s
                        .parse()
                        .map_err(|_| self.err(format!("bad GET index {s:?}")))?;
                    self.memo_get(i)?
                }
                // ---- globals and calls
                b'c' => {
                    let module = self.text_line()?;
                    let name = self.text_line()?;
                    self.global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.leaf(module), self.leaf(name)) {
                        (Some(Value::Str(m)), Some(Value::Str(n))) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?
                        }
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'i' => {
                    // INST names its class inline: refuse a forbidden one by name first.
                    let module = self.text_line()?;
                    let name = self.text_line()?;
                    self.global(&module, &name)?;
                    return Err(self.err(format!(
                        "opcode INST (0x69) is not supported (class {module}.{name})"
                    )));
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let h = self.call(callable, args, "REDUCE")?;
                    self.push_handle(h)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let h = self.call(cls, args, "NEWOBJ")?;
                    self.push_handle(h)?
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match self.objs.get(kwargs) {
                        Some(Obj::Dict(d)) if d.items.is_empty() => {}
                        _ => return Err(self.err("NEWOBJ_EX with keyword arguments")),
                    }
                    let h = self.call(cls, args, "NEWOBJ_EX")?;
                    self.push_handle(h)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    let kind = self.kind(target);
                    match self.objs.get_mut(target) {
                        Some(Obj::Dict(d)) => d.state = Some(state),
                        _ => return Err(self.err(format!("BUILD on a {kind} is not supported"))),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push_value(v)?
                }
                b'P' => {
                    let pid = self.text_line()?;
                    return Err(self.err(format!(
                        "text persistent id {pid:?} is not a torch storage reference"
                    )));
                }
                0x98 => {
                    self.top()?;
                }
                _ => {
                    return Err(self.err(match opcode_name(op) {
                        Some(name) => format!("opcode {name} (0x{op:02x}) is not supported"),
                        None => format!("unknown opcode 0x{op:02x}"),
                    }))
                }
            }
        }
    }

    /// The items of a tuple or list.
    fn seq(&self, h: H) -> Option<&[H]> {
        match self.objs.get(h) {
            Some(Obj::Tuple(v) | Obj::List(v)) => Some(v),
            _ => None,
        }
    }

    fn int_arg(&self, h: H, what: &str) -> Result<i64, PickleError> {
        match self.leaf(h) {
            Some(Value::Int(i)) => Ok(*i),
            _ => Err(self.err(format!("{what} is a {}, not an int", self.kind(h)))),
        }
    }

    fn count_arg(&self, h: H, what: &str) -> Result<u64, PickleError> {
        let i = self.int_arg(h, what)?;
        u64::try_from(i).map_err(|_| self.err(format!("{what} is negative ({i})")))
    }

    fn bool_arg(&self, h: H, what: &str) -> Result<bool, PickleError> {
        match self.leaf(h) {
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Int(i @ (0 | 1))) => Ok(*i == 1),
            _ => Err(self.err(format!("{what} is a {}, not a bool", self.kind(h)))),
        }
    }

    fn str_arg(&self, h: H, what: &str) -> Result<String, PickleError> {
        match self.leaf(h) {
            Some(Value::Str(s)) => Ok(s.clone()),
            Some(Value::Bytes(b)) if b.is_ascii() => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(Value::Int(i)) => Ok(i.to_string()),
            _ => Err(self.err(format!("{what} is a {}, not a string", self.kind(h)))),
        }
    }

    fn dims_arg(&self, h: H, what: &str) -> Result<Vec<u64>, PickleError> {
        let items = self
            .seq(h)
            .ok_or_else(|| self.err(format!("{what} is a {}, not a tuple", self.kind(h))))?;
        if items.len() > self.limits.max_rank {
            return Err(self.err(format!(
                "{what} has {} dimensions, more than {}",
                items.len(),
                self.limits.max_rank
            )));
        }
        items.iter().map(|&i| self.count_arg(i, what)).collect()
    }

    /// Apply an allowed global to its arguments: build what it would have built.
    fn call(&mut self, callable: H, args: H, op: &str) -> Result<H, PickleError> {
        let g = match self.leaf(callable) {
            Some(Value::Global(g)) => *g,
            _ => return Err(self.err(format!("{op} on a {}, not a global", self.kind(callable)))),
        };
        let args: Vec<H> = match self.objs.get(args) {
            Some(Obj::Tuple(v)) => v.clone(),
            _ => {
                return Err(self.err(format!(
                    "{op} arguments are a {}, not a tuple",
                    self.kind(args)
                )))
            }
        };
        let arity = |n: &[usize]| -> Result<(), PickleError> {
            if n.contains(&args.len()) {
                Ok(())
            } else {
                Err(self.err(format!("{g} called with {} arguments", args.len())))
            }
        };
        match g {
            Global::OrderedDict => {
                arity(&[0, 1])?;
                let h = self.alloc(Obj::Dict(Box::default()))?;
                if let Some(&init) = args.first() {
                    let pairs = self
                        .seq(init)
                        .ok_or_else(|| self.err("OrderedDict(...) with a non-sequence"))?
                        .to_vec();
                    let mut flat = Vec::with_capacity(pairs.len() * 2);
                    for p in pairs {
                        match self.seq(p) {
                            Some([k, v]) => flat.extend([*k, *v]),
                            _ => return Err(self.err("OrderedDict(...) item is not a pair")),
                        }
                    }
                    self.set_items(h, &flat)?;
                }
                Ok(h)
            }
            Global::Set | Global::FrozenSet => {
                arity(&[0, 1])?;
                let items = match args.first() {
                    None => Vec::new(),
                    Some(&a) => match self.objs.get(a) {
                        Some(Obj::Tuple(v) | Obj::List(v) | Obj::Set(v)) => v.clone(),
                        _ => return Err(self.err(format!("{g}(...) with a non-sequence"))),
                    },
                };
                self.alloc(Obj::Set(items))
            }
            Global::TorchSize => {
                arity(&[0, 1])?;
                let items = match args.first() {
                    None => Vec::new(),
                    Some(&a) => self
                        .seq(a)
                        .ok_or_else(|| self.err("torch.Size(...) with a non-sequence"))?
                        .to_vec(),
                };
                self.alloc(Obj::Tuple(items))
            }
            Global::CodecsEncode => {
                arity(&[1, 2])?;
                let text = match self.leaf(args[0]) {
                    Some(Value::Str(s)) => s.clone(),
                    _ => return Err(self.err("_codecs.encode of a non-string")),
                };
                let encoding = match args.get(1) {
                    None => "utf-8".to_string(),
                    Some(&e) => self.str_arg(e, "_codecs.encode encoding")?,
                };
                let bytes = match encoding.to_ascii_lowercase().as_str() {
                    "latin1" | "latin-1" | "iso-8859-1" => text
                        .chars()
                        .map(|c| u8::try_from(c as u32))
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| self.err("_codecs.encode: character outside latin-1"))?,
                    "utf-8" | "utf8" => text.into_bytes(),
                    other => {
                        return Err(
                            self.err(format!("_codecs.encode to {other:?} is not supported"))
                        )
                    }
                };
                self.alloc(Obj::Leaf(Value::Bytes(bytes)))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                if g == Global::RebuildTensor {
                    arity(&[4])?;
                } else {
                    arity(&[6, 7])?;
                }
                let storage = match self.leaf(args[0]) {
                    Some(Value::Storage(s)) => (**s).clone(),
                    _ => {
                        return Err(self.err(format!(
                            "{g}: first argument is a {}, not a storage",
                            self.kind(args[0])
                        )))
                    }
                };
                let storage_offset = self.count_arg(args[1], "tensor storage offset")?;
                let size = self.dims_arg(args[2], "tensor size")?;
                let stride = self.dims_arg(args[3], "tensor stride")?;
                if size.len() != stride.len() {
                    return Err(self.err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in rank"
                    )));
                }
                let requires_grad = match args.get(4) {
                    Some(&h) => self.bool_arg(h, "requires_grad")?,
                    None => false,
                };
                let spec = TensorSpec {
                    index: self.tensors.len(),
                    storage,
                    storage_offset,
                    size,
                    stride,
                    requires_grad,
                    parameter: false,
                };
                self.tensors.push(spec.clone());
                self.alloc(Obj::Leaf(Value::TensorRef(Box::new(spec))))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                if g == Global::RebuildParameter {
                    arity(&[3])?;
                } else {
                    arity(&[4])?;
                }
                let mut spec = match self.leaf(args[0]) {
                    Some(Value::TensorRef(t)) => t.clone(),
                    _ => {
                        return Err(self.err(format!(
                            "{g}: first argument is a {}, not a tensor",
                            self.kind(args[0])
                        )))
                    }
                };
                spec.requires_grad = self.bool_arg(args[1], "requires_grad")?;
                spec.parameter = true;
                self.alloc(Obj::Leaf(Value::TensorRef(spec)))
            }
            Global::Storage(_) | Global::Dtype(_) => {
                Err(self.err(format!("{op} on {g}, which cannot be called")))
            }
        }
    }

    /// `persistent_load`: a torch storage reference.
    fn persistent_load(&mut self, pid: H) -> Result<Value, PickleError> {
        let items = match self.objs.get(pid) {
            Some(Obj::Tuple(v)) => v.clone(),
            _ => {
                return Err(self.err(format!(
                    "persistent id is a {}, not a tuple",
                    self.kind(pid)
                )))
            }
        };
        let Some(&tag) = items.first() else {
            return Err(self.err("empty persistent id"));
        };
        let tag = self.str_arg(tag, "persistent id tag")?;
        if tag == "module" {
            return Err(self.err(
                "refused persistent id 'module': the file pickles a whole nn.Module, which \
                 needs its Python class to rebuild; save and load model.state_dict() instead",
            ));
        }
        if tag != "storage" {
            return Err(self.err(format!("unknown persistent id type {tag:?}")));
        }
        // ('storage', type, key, location, numel) in zip files; legacy files add a view.
        if items.len() != 5 && items.len() != 6 {
            return Err(self.err(format!(
                "storage reference with {} fields, not 5 or 6",
                items.len()
            )));
        }
        let storage_type = match self.leaf(items[1]) {
            Some(Value::Global(Global::Storage(t))) => *t,
            _ => {
                return Err(self.err(format!(
                    "storage type is a {}, not a torch storage class",
                    self.kind(items[1])
                )))
            }
        };
        let key = self.str_arg(items[2], "storage key")?;
        let location = self.str_arg(items[3], "storage location")?;
        let numel = self.count_arg(items[4], "storage size")?;
        let view = match items.get(5).map(|&h| (h, self.leaf(h))) {
            None | Some((_, Some(Value::None))) => None,
            Some((h, _)) => match self.seq(h) {
                Some(&[k, o, n]) => {
                    let v = StorageView {
                        key: self.str_arg(k, "storage view key")?,
                        offset: self.count_arg(o, "storage view offset")?,
                        numel: self.count_arg(n, "storage view size")?,
                    };
                    if v.offset.checked_add(v.numel).is_none_or(|end| end > numel) {
                        return Err(self.err(format!(
                            "storage view {} covers elements {}..+{} of storage {key}, \
                             which holds {numel}",
                            v.key, v.offset, v.numel
                        )));
                    }
                    Some(v)
                }
                _ => return Err(self.err("storage view is not a (key, offset, size) triple")),
            },
        };
        let r = StorageRef {
            key,
            storage_type,
            location,
            numel,
            view,
        };
        match self.storage_index.get(&r.key) {
            Some(&i) => {
                let first = &self.storages[i];
                if first.storage_type != r.storage_type || first.numel != r.numel {
                    return Err(self.err(format!(
                        "storage {} is declared twice: {} x {} and {} x {}",
                        r.key,
                        first.numel,
                        first.storage_type.class_name(),
                        r.numel,
                        r.storage_type.class_name()
                    )));
                }
            }
            None => {
                self.storage_index
                    .insert(r.key.clone(), self.storages.len());
                self.storages.push(StorageRef {
                    view: None,
                    ..r.clone()
                });
            }
        }
        Ok(Value::Storage(Box::new(r)))
    }

    /// Copy the object graph under `h` out as a tree, within the depth and size limits
    /// (a cycle or a shared-object blow-up ends in an error, not a hang).
    fn tree(&self, h: H, depth: usize, budget: &mut Budget) -> Result<Value, PickleError> {
        if depth > self.limits.max_depth {
            return Err(self.err(format!(
                "containers nested deeper than {} (or a cycle)",
                self.limits.max_depth
            )));
        }
        if budget.nodes == 0 {
            return Err(self.err(format!(
                "result has more than {} values",
                self.limits.max_tree_nodes
            )));
        }
        budget.nodes -= 1;
        let seq = |v: &[H], budget: &mut Budget| -> Result<Vec<Value>, PickleError> {
            v.iter().map(|&c| self.tree(c, depth + 1, budget)).collect()
        };
        Ok(match self.objs.get(h) {
            None => return Err(self.err("dangling object handle")),
            Some(Obj::Leaf(v)) => {
                let n = match v {
                    Value::Str(s) => s.len(),
                    Value::Bytes(b) | Value::BigInt(b) => b.len(),
                    _ => 0,
                };
                if n > budget.bytes {
                    return Err(self.err(format!(
                        "result holds more than {} bytes of strings",
                        self.limits.max_tree_bytes
                    )));
                }
                budget.bytes -= n;
                v.clone()
            }
            Some(Obj::Tuple(v)) => Value::Tuple(seq(v, budget)?),
            Some(Obj::List(v)) => Value::List(seq(v, budget)?),
            Some(Obj::Set(v)) => Value::Set(seq(v, budget)?),
            Some(Obj::Dict(d)) => {
                let mut items = Vec::with_capacity(d.items.len());
                for &(k, v) in &d.items {
                    items.push((
                        self.tree(k, depth + 1, budget)?,
                        self.tree(v, depth + 1, budget)?,
                    ));
                }
                let state = match d.state {
                    Some(s) => Some(Box::new(self.tree(s, depth + 1, budget)?)),
                    None => None,
                };
                Value::Dict(Dict { items, state })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Unpickled, FormatError> {
        unpickle(bytes, &Limits::default(), Path::new("t"))
    }

    fn err(bytes: &[u8]) -> String {
        match run(bytes) {
            Ok(v) => panic!("expected an error, got {:?}", v.value),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn shared_list_sees_appends_made_after_it_was_memoised() {
        // x = [1, 2]; pickle.dumps([x, x], protocol=2)
        let b = b"\x80\x02]q\x00(]q\x01(K\x01K\x02eh\x01e.";
        let v = run(b).unwrap().value;
        let Value::List(outer) = v else { panic!() };
        assert_eq!(outer.len(), 2);
        for inner in outer {
            let Value::List(i) = inner else { panic!() };
            assert!(matches!(i[..], [Value::Int(1), Value::Int(2)]));
        }
    }

    #[test]
    fn values_stay_small_so_the_object_limit_bounds_memory() {
        assert!(
            std::mem::size_of::<Value>() <= 40,
            "{}",
            std::mem::size_of::<Value>()
        );
        assert!(
            std::mem::size_of::<Obj>() <= 48,
            "{}",
            std::mem::size_of::<Obj>()
        );
    }

    #[test]
    fn big_and_negative_longs_decode() {
        assert!(matches!(int_from_le(vec![0xff]), Value::Int(-1)));
        assert!(matches!(int_from_le(vec![]), Value::Int(0)));
        assert!(matches!(
            int_from_le(vec![0x00, 0x80, 0x00]),
            Value::Int(0x8000)
        ));
        let max = int_from_le(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00]);
        assert!(matches!(max, Value::Int(i64::MAX)));
        let big = int_from_le(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0x00]);
        assert!(matches!(big, Value::BigInt(_)));
    }

    #[test]
    fn refuses_unlisted_global_by_name() {
        let e = err(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R.");
        assert!(e.contains("refused global os.system"), "{e}");
        let e = err(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.");
        assert!(e.contains("refused global builtins.eval"), "{e}");
    }

    #[test]
    fn a_cycle_is_an_error_not_a_hang() {
        // l = []; l.append(l)
        let e = err(b"\x80\x02]q\x00h\x00a.");
        assert!(e.contains("nested deeper"), "{e}");
    }

    #[test]
    fn shared_object_blow_up_hits_the_tree_size_limit() {
        // x0 = []; x{i} = [x{i-1}, x{i-1}]: 2^60 nodes as a tree from 60 short lines.
        let mut b = b"\x80\x02]q\x00".to_vec();
        for i in 1..=60u8 {
            b.extend([b'(', b'h', i - 1, b'h', i - 1, b'l', b'q', i]);
        }
        b.push(b'.');
        let e = err(&b);
        assert!(e.contains("result has more than"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 1000 lists, each appended into the one before: depth 1000.
        let mut b = b"\x80\x02".to_vec();
        b.extend([b']'; 1000]);
        b.extend([b'a'; 999]);
        b.push(b'.');
        let e = err(&b);
        assert!(e.contains("nested deeper than 200"), "{e}");
    }

    #[test]
    fn stack_and_memo_limits_hold() {
        let limits = Limits {
            max_stack: 10,
            max_memo: 3,
            ..Limits::default()
        };
        let run = |b: &[u8]| {
            unpickle(b, &limits, Path::new("t"))
                .unwrap_err()
                .to_string()
        };
        let e = run(&[b'N'; 11]);
        assert!(e.contains("stack deeper than 10"), "{e}");
        let e = run(b"Nq\x00q\x01q\x02q\x03.");
        assert!(e.contains("memo larger than 3"), "{e}");
    }

    #[test]
    fn unknown_opcode_is_named_with_its_offset() {
        let e = err(b"\x80\x02\xff.");
        assert!(
            e.contains("byte 2") && e.contains("unknown opcode 0xff"),
            "{e}"
        );
    }

    #[test]
    fn lengths_are_checked_before_allocating() {
        let e = err(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f");
        assert!(e.contains("unexpected end of data"), "{e}");
    }

    #[test]
    fn duplicate_dict_keys_replace_in_place() {
        // DICT from MARK: {"a": 1, "b": 2, "a": 3} -> {"a": 3, "b": 2}
        let b = b"(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02X\x01\x00\x00\x00aK\x03d.";
        let Value::Dict(d) = run(b).unwrap().value else {
            panic!()
        };
        assert_eq!(d.items.len(), 2);
        assert!(matches!(d.get("a"), Some(Value::Int(3))));
    }
}
