//! The KV transfer codec: a sequence's latent cache as typed layer rows, cut into chunks of
//! whole rows for the wire and put back together on the other side. Both ends of a cache
//! push (the prefill worker's transfer, the decode worker's import) and `kv-bench` use it;
//! each service converts [`KvPart`]s to and from protobuf in its own wire module.
//!
//! Transfer format: a row is `latent_dim` little-endian f32 values; a chunk holds whole rows
//! of one layer starting at `first_token`; a layer's chunks come in order, layers in any
//! order; a push is a header, the chunks of every layer (the MTP layer's last, when the
//! sender ran it), then the commit (with the MTP layer's state, in the same encoding).

use crate::cache::CacheLayout;

/// Bytes per cache value on the wire (little-endian f32).
pub const VALUE_BYTES: usize = 4;

/// One layer's latent rows for tokens `[0, num_tokens)` of one sequence, row-major.
///
/// Invariant: `latent_dim >= 1` and divides `data.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRows {
    layer: usize,
    latent_dim: usize,
    data: Vec<f32>,
}

impl LayerRows {
    /// Rows of `layer`, `latent_dim` values each; refused when `data` is not whole rows.
    pub fn new(layer: usize, latent_dim: usize, data: Vec<f32>) -> Result<Self, KvError> {
        if latent_dim == 0 || !data.len().is_multiple_of(latent_dim) {
            return Err(KvError::RowWidth { layer, values: data.len(), latent_dim });
        }
        Ok(LayerRows { layer, latent_dim, data })
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Values per row.
    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }

    pub fn num_tokens(&self) -> usize {
        self.data.len() / self.latent_dim
    }

    /// Row `t` is `data()[t * latent_dim..(t + 1) * latent_dim]`.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Size in the transfer format.
    pub fn wire_bytes(&self) -> usize {
        self.data.len() * VALUE_BYTES
    }
}

/// What one push carries: `num_layers` layers of `num_tokens` rows of `latent_dim` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub num_tokens: usize,
    pub latent_dim: usize,
    pub num_layers: usize,
}

impl KvShape {
    pub fn row_bytes(&self) -> usize {
        self.latent_dim * VALUE_BYTES
    }

    pub fn layer_bytes(&self) -> usize {
        self.num_tokens * self.row_bytes()
    }

    /// Every layer, in the transfer format.
    pub fn total_bytes(&self) -> u64 {
        (self.layer_bytes() * self.num_layers) as u64
    }

    /// Whether `rows` is one whole layer of this push.
    pub fn check(&self, rows: &LayerRows) -> Result<(), KvError> {
        if rows.layer() >= self.num_layers {
            return Err(KvError::NoSuchLayer { layer: rows.layer(), num_layers: self.num_layers });
        }
        if rows.latent_dim() != self.latent_dim || rows.num_tokens() != self.num_tokens {
            return Err(KvError::WrongRows {
                layer: rows.layer(),
                num_tokens: rows.num_tokens(),
                latent_dim: rows.latent_dim(),
                want_tokens: self.num_tokens,
                want_dim: self.latent_dim,
            });
        }
        Ok(())
    }
}

/// Rows `[first_token, first_token + data.len() / row_bytes)` of `layer`, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerChunk {
    pub layer: usize,
    pub first_token: usize,
    pub data: Vec<u8>,
}

/// What makes the receiver's copy runnable.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCommit {
    /// The prompt then the token sampled by the prefill.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub prompt_logits_top: Vec<(u32, f32)>,
    /// The MTP layer's output at the last prompt position (what decoding drafts from first);
    /// empty when the sender ran no MTP layer.
    pub mtp_hidden: Vec<f32>,
}

/// One message of a cache push.
#[derive(Debug, Clone, PartialEq)]
pub enum KvPart {
    Header { request_id: u64, shape: KvShape },
    Layer(LayerChunk),
    Commit(KvCommit),
}

/// Why rows or a push were refused. Each variant names the layer, token or field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("layer {layer}: {values} values are not whole rows of {latent_dim}")]
    RowWidth { layer: usize, values: usize, latent_dim: usize },
    #[error("layer {layer} has {num_tokens} rows of {latent_dim}; expected {want_tokens} rows of {want_dim}")]
    WrongRows { layer: usize, num_tokens: usize, latent_dim: usize, want_tokens: usize, want_dim: usize },
    #[error("the stream must start with a KvHeader")]
    NoHeader,
    #[error("second KvHeader in one stream")]
    SecondHeader,
    #[error("cache shape {num_layers} layers x {latent_dim} does not match this model's {want_layers} x {want_dim}")]
    ShapeMismatch { num_layers: usize, latent_dim: usize, want_layers: usize, want_dim: usize },
    #[error("num_tokens 0 must be >= 1")]
    NoTokens,
    #[error("num_tokens {num_tokens} exceeds this worker's cache of {capacity} tokens")]
    TooManyTokens { num_tokens: usize, capacity: usize },
    #[error("layer {layer} does not exist (the model has {num_layers})")]
    NoSuchLayer { layer: usize, num_layers: usize },
    #[error("layer {layer} sent twice")]
    DuplicateLayer { layer: usize },
    #[error("layer {layer}: chunk starts at token {first_token}, expected {expected}")]
    OutOfOrder { layer: usize, first_token: usize, expected: usize },
    #[error("layer {layer}: {bytes} bytes is not a whole number of {row_bytes}-byte rows")]
    PartialRow { layer: usize, bytes: usize, row_bytes: usize },
    #[error("layer {layer}: more than the {num_tokens} announced tokens")]
    TooManyRows { layer: usize, num_tokens: usize },
    #[error("KvCommit before layer {layer} was complete ({received} of {num_tokens} tokens)")]
    MissingRows { layer: usize, received: usize, num_tokens: usize },
    #[error("a part after the KvCommit")]
    AfterCommit,
    #[error("stream ended before KvCommit")]
    NoCommit,
    #[error("{what}: {bytes} bytes are not whole little-endian f32 values")]
    PartialValue { what: &'static str, bytes: usize },
}

/// `rows` cut into chunks of whole rows of at most `max_bytes` (at least one row each), in
/// order and encoded; together they cover every row exactly once.
pub fn chunk_layer(rows: &LayerRows, max_bytes: usize) -> impl Iterator<Item = LayerChunk> + '_ {
    let row_bytes = rows.latent_dim * VALUE_BYTES;
    let rows_per_chunk = (max_bytes / row_bytes).max(1);
    rows.data.chunks(rows_per_chunk * rows.latent_dim).enumerate().map(move |(i, values)| LayerChunk {
        layer: rows.layer,
        first_token: i * rows_per_chunk,
        data: encode(values),
    })
}

/// `values` in the transfer format (little-endian f32): what a chunk's rows and the commit's
/// MTP state are on the wire.
pub fn encode(values: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(values).to_vec()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// The values of `bytes` in the transfer format; refused unless they are whole values.
pub fn decode(what: &'static str, bytes: &[u8]) -> Result<Vec<f32>, KvError> {
    if !bytes.len().is_multiple_of(VALUE_BYTES) {
        return Err(KvError::PartialValue { what, bytes: bytes.len() });
    }
    let mut out = Vec::with_capacity(bytes.len() / VALUE_BYTES);
    decode_into(bytes, &mut out);
    Ok(out)
}

/// Appends `bytes` (whole values) to `out`.
fn decode_into(bytes: &[u8], out: &mut Vec<f32>) {
    debug_assert!(bytes.len().is_multiple_of(VALUE_BYTES));
    if cfg!(target_endian = "little") {
        let start = out.len();
        out.resize(start + bytes.len() / VALUE_BYTES, 0.0);
        bytemuck::cast_slice_mut::<f32, u8>(&mut out[start..]).copy_from_slice(bytes);
    } else {
        out.extend(bytes.chunks_exact(VALUE_BYTES).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    }
}

/// What one accepted part gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// The header: whose cache this is and its shape.
    Header { request_id: u64, shape: KvShape },
    /// A chunk that leaves its layer incomplete.
    Partial,
    /// A layer's last chunk: the whole layer of the header's request.
    Layer { request_id: u64, rows: LayerRows },
    /// The commit of the header's request, every layer having arrived.
    Commit { request_id: u64, commit: KvCommit },
}

/// Puts one push back together, part by part, for a worker whose cache is `layout`.
#[derive(Debug)]
pub struct Reassembly {
    layout: CacheLayout,
    state: State,
    bytes: u64,
}

#[derive(Debug)]
enum State {
    AwaitHeader,
    Layers { request_id: u64, shape: KvShape, layers: Vec<Progress> },
    Committed,
}

#[derive(Debug)]
enum Progress {
    /// Rows received so far, in order.
    Filling(Vec<f32>),
    /// Handed out whole.
    Done,
}

impl Reassembly {
    pub fn new(layout: CacheLayout) -> Self {
        debug_assert!(layout.latent_dim >= 1, "a model's latent rows hold at least one value");
        Reassembly { layout, state: State::AwaitHeader, bytes: 0 }
    }

    /// Layer bytes accepted so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    /// The header's request id, once it arrived.
    pub fn request_id(&self) -> Option<u64> {
        match self.state {
            State::Layers { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    /// Takes the next part of the push.
    pub fn accept(&mut self, part: KvPart) -> Result<Received, KvError> {
        let (request_id, shape, layers) = match (&mut self.state, &part) {
            (State::Committed, _) => return Err(KvError::AfterCommit),
            (State::AwaitHeader, KvPart::Header { request_id, shape }) => {
                let (request_id, shape) = (*request_id, *shape);
                check_header(self.layout, shape)?;
                let layers = (0..shape.num_layers).map(|_| Progress::Filling(Vec::new())).collect();
                self.state = State::Layers { request_id, shape, layers };
                return Ok(Received::Header { request_id, shape });
            }
            (State::AwaitHeader, _) => return Err(KvError::NoHeader),
            (State::Layers { request_id, shape, layers }, _) => (*request_id, *shape, layers),
        };
        match part {
            KvPart::Header { .. } => Err(KvError::SecondHeader),
            KvPart::Layer(chunk) => {
                let bytes = chunk.data.len() as u64;
                let whole = add_chunk(shape, layers, chunk)?;
                self.bytes += bytes;
                Ok(match whole {
                    Some(rows) if rows.layer() < self.layout.num_layers => Received::Layer { request_id, rows },
                    // The MTP layer of a sender, for a receiver without one.
                    Some(_) | None => Received::Partial,
                })
            }
            KvPart::Commit(commit) => {
                let incomplete = layers.iter().enumerate().find_map(|(layer, p)| match p {
                    Progress::Filling(rows) => Some((layer, rows.len() / shape.latent_dim)),
                    Progress::Done => None,
                });
                if let Some((layer, received)) = incomplete {
                    return Err(KvError::MissingRows { layer, received, num_tokens: shape.num_tokens });
                }
                self.state = State::Committed;
                Ok(Received::Commit { request_id, commit })
            }
        }
    }

    /// The push is over (committed, or the sender closed the stream): its layer bytes, or
    /// the error of a push that ended before its commit.
    pub fn finish(&self) -> Result<u64, KvError> {
        match self.state {
            State::Committed => Ok(self.bytes),
            _ => Err(KvError::NoCommit),
        }
    }
}

/// Whether a header fits this worker: its model's shape, at least one token, within the cache.
/// One layer more or less is the MTP layer: a sender that ran none (the engine then decodes
/// without speculation, and refuses the push if a main layer is what is missing), or a
/// receiver that does not speculate (the rows are received and dropped).
fn check_header(l: CacheLayout, shape: KvShape) -> Result<(), KvError> {
    if shape.latent_dim != l.latent_dim || shape.num_layers.abs_diff(l.num_layers) > 1 {
        return Err(KvError::ShapeMismatch {
            num_layers: shape.num_layers,
            latent_dim: shape.latent_dim,
            want_layers: l.num_layers,
            want_dim: l.latent_dim,
        });
    }
    if shape.num_tokens == 0 {
        return Err(KvError::NoTokens);
    }
    // Bounds what a header can make this side allocate.
    let capacity = l.num_blocks * l.block_size;
    if shape.num_tokens > capacity {
        return Err(KvError::TooManyTokens { num_tokens: shape.num_tokens, capacity });
    }
    Ok(())
}

/// Appends one chunk to its layer; returns the layer once it is whole.
fn add_chunk(shape: KvShape, layers: &mut [Progress], chunk: LayerChunk) -> Result<Option<LayerRows>, KvError> {
    let LayerChunk { layer, first_token, data } = chunk;
    let rows = match layers.get_mut(layer) {
        None => return Err(KvError::NoSuchLayer { layer, num_layers: shape.num_layers }),
        Some(Progress::Done) => return Err(KvError::DuplicateLayer { layer }),
        Some(Progress::Filling(rows)) => rows,
    };
    let have = rows.len() / shape.latent_dim;
    if first_token != have {
        return Err(KvError::OutOfOrder { layer, first_token, expected: have });
    }
    let row_bytes = shape.row_bytes();
    if !data.len().is_multiple_of(row_bytes) {
        return Err(KvError::PartialRow { layer, bytes: data.len(), row_bytes });
    }
    if have + data.len() / row_bytes > shape.num_tokens {
        return Err(KvError::TooManyRows { layer, num_tokens: shape.num_tokens });
    }
    if rows.is_empty() {
        rows.reserve_exact(shape.num_tokens * shape.latent_dim);
    }
    decode_into(&data, rows);
    if rows.len() < shape.num_tokens * shape.latent_dim {
        return Ok(None);
    }
    let rows = std::mem::take(rows);
    layers[layer] = Progress::Done;
    Ok(Some(LayerRows::new(layer, shape.latent_dim, rows).expect("whole rows were checked chunk by chunk")))
}

#[cfg(test)]
#[path = "kv_tests.rs"]
mod tests;
