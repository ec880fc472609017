//! Dequantization of ggml tensor encodings to f32 (block layouts as in llama.cpp's ggml-quants.c).

use half::{bf16, f16};

use super::GgufError;

/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

/// ggml tensor element types this loader understands (ids from ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4K = 12,
    Q6K = 14,
    BF16 = 30,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Result<Self, GgufError> {
        Ok(match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => return Err(GgufError::UnsupportedType(other)),
        })
    }

    /// (elements per block, bytes per block).
    pub fn block_layout(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q6K => (QK_K, 210),
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `n` elements encoded as `ty` in `bytes`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, GgufError> {
    let (block, size) = ty.block_layout();
    if !n.is_multiple_of(block) || bytes.len() != n / block * size {
        return Err(GgufError::Invalid(format!(
            "{ty:?}: {} bytes cannot hold {n} elements",
            bytes.len()
        )));
    }
    let mut out = vec![0f32; n];
    let blocks = bytes.chunks_exact(size).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q4K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
    }
    Ok(out)
}

/// block_q4_0: d f16, qs[16]; x = (nibble - 8) * d, low nibbles first half, high second.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// block_q4_1: d f16, m f16, qs[16]; x = nibble * d + m.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// block_q8_0: d f16, qs[32] i8; x = q * d.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// 6-bit scale and min of sub-block `j` packed in the 12 scale bytes of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K: d f16, dmin f16, scales[12], qs[128]; 8 sub-blocks of 32 with 6-bit scale/min:
/// x = d * sc * nibble - dmin * m.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// block_q6_K: ql[128], qh[64], scales[16] i8, d f16; 16 sub-blocks of 16 with 8-bit scales:
/// x = d * scale * (q6 - 32), q6 = 4 low bits from ql | 2 high bits from qh.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..];
        let qh = &qh_all[32 * half..];
        let sc = &sc_all[8 * half..];
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn plain_float_types() {
        let b: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F32, &b, 2).unwrap(), vec![1.5, -2.0]);
        let b: Vec<u8> = [h(0.5), h(-3.0)].concat();
        assert_eq!(dequantize(GgmlType::F16, &b, 2).unwrap(), vec![0.5, -3.0]);
        let b: Vec<u8> = [
            bf16::from_f32(256.0).to_le_bytes(),
            bf16::from_f32(-0.125).to_le_bytes(),
        ]
        .concat();
        assert_eq!(
            dequantize(GgmlType::BF16, &b, 2).unwrap(),
            vec![256.0, -0.125]
        );
    }

    #[test]
    fn q4_0_block() {
        // d = 0.5; byte j = (lo = j, hi = 15 - j)
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
        assert_eq!(y[0], -4.0);
        assert_eq!(y[16], 3.5);
    }

    #[test]
    fn q4_1_block() {
        // d = 0.25, m = -1.0; byte j = (lo = j, hi = 3)
        let mut b = [h(0.25), h(-1.0)].concat();
        b.extend((0..16u8).map(|j| j | (3 << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0], -1.0);
        assert_eq!(y[15], 15.0 * 0.25 - 1.0);
        assert!(y[16..].iter().all(|v| *v == 3.0 * 0.25 - 1.0));
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        b[2 + 31] = (-128i8) as u8;
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -32.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[30], 28.0);
        assert_eq!(y[31], -256.0);
    }

    #[test]
    fn q4_k_block() {
        // d = 1, dmin = 0.5. Scales: sub-blocks 0..4 use the low 6 bits of bytes 0..4 (scale)
        // and 4..8 (min); sub-blocks 4..8 take 4 low bits from bytes 8..12 and 2 high bits from
        // the top bits of bytes 0..4 (scale) / 4..8 (min).
        let mut scales = [0u8; 12];
        scales[0] = 3; // sub-block 0 scale 3
        scales[4] = 2; // sub-block 0 min 2
        scales[1] = 5; // sub-block 1 scale 5, min 0
                       // sub-block 4: scale = (b[8] & 0xF) | (b[0] >> 6) << 4 = 1 | 1<<4 = 17;
                       //              min   = (b[8] >> 4) | (b[4] >> 6) << 4 = 2 | 2<<4 = 34
        scales[0] |= 1 << 6;
        scales[4] |= 2 << 6;
        scales[8] = 1 | (2 << 4);
        let mut b = [h(1.0), h(0.5)].concat();
        b.extend_from_slice(&scales);
        let mut qs = [0u8; 128];
        qs[0] = 7 | (9 << 4); // y[0] (sub-block 0) = 7, y[32] (sub-block 1) = 9
        qs[64] = 4; // y[128] (sub-block 4) = 4
        b.extend_from_slice(&qs);
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        assert_eq!(y[0], 3.0 * 7.0 - 0.5 * 2.0);
        assert_eq!(y[1], -1.0); // nibble 0: -dmin * min
        assert_eq!(y[32], 5.0 * 9.0);
        assert_eq!(y[128], 17.0 * 4.0 - 0.5 * 34.0);
        assert_eq!(y[129], -0.5 * 34.0);
        assert_eq!(y[255], 0.0); // sub-block 7: scale 0, min 0
    }

    #[test]
    fn q6_k_block() {
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        let mut sc = [0i8; 16];
        sc[0] = 2; // elements 0..16
        sc[2] = -1; // elements 32..48
        sc[4] = 3; // elements 64..80
        sc[6] = 1; // elements 96..112
        sc[8] = 4; // elements 128..144
        ql[0] = 0x5 | (0xA << 4); // y[0] low 5, y[64] low 10
        qh[0] = 0b11 | (0b01 << 4); // y[0] high 3 -> q=53; y[64] high 1 -> q=26
        ql[32] = 0xF; // y[32] low 15, high 0 -> q=15
        ql[64] = 0x1; // second half: y[128] low 1, high 0 -> q=1
        let mut b = Vec::new();
        b.extend_from_slice(&ql);
        b.extend_from_slice(&qh);
        b.extend(sc.iter().map(|s| *s as u8));
        b.extend_from_slice(&h(0.5));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        assert_eq!(y[0], 0.5 * 2.0 * (53.0 - 32.0));
        assert_eq!(y[32], -0.5 * (15.0 - 32.0));
        assert_eq!(y[64], 0.5 * 3.0 * (26.0 - 32.0));
        assert_eq!(y[96], 0.5 * 1.0 * -32.0);
        assert_eq!(y[128], 0.5 * 4.0 * (1.0 - 32.0));
        assert_eq!(y[200], 0.0); // scale 0
    }

    #[test]
    fn size_mismatch_is_an_error() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize(GgmlType::Q4_1, &[0u8; 20], 31).is_err());
        assert!(GgmlType::from_u32(99).is_err());
    }
}
