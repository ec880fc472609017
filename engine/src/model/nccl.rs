//! NCCL collectives between tensor-parallel ranks on several GPUs (CUDA builds only; libnccl is
//! opened at run time when a rank group is created, so the binary starts without it).
//!
//! One communicator per rank, created together from one thread (`ncclCommInitAll`) on the
//! streams candle computes on, so a collective is ordered after the kernels that made its input.
//! NVLink multicast (NVLS) stays off: `NCCL_NVLS_ENABLE=0` is set unless the environment sets it.

use super::tp::Collective;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use std::sync::Arc;

/// A rank's communicator. NCCL communicators are used from one thread at a time; the engine
/// calls each rank's only from that rank's worker thread.
#[derive(Debug)]
struct RankComm(Comm);
// SAFETY: the communicator handle is moved to its rank's thread once and used only there.
unsafe impl Send for RankComm {}
// SAFETY: see above; `Collective` is shared only within the rank's own thread.
unsafe impl Sync for RankComm {}

/// One rank of an NCCL group.
#[derive(Debug, Clone)]
pub struct NcclCollective {
    comm: Arc<RankComm>,
}

impl NcclCollective {
    /// One communicator per device (rank r = `devices[r]`, which must be distinct GPUs).
    pub fn group(devices: &[Device]) -> Result<Vec<NcclCollective>> {
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { candle_core::cuda_backend::cudarc::nccl::sys::is_culib_present() } {
            bail!(
                "libnccl could not be opened (tensor parallelism on GPUs needs NCCL: put the \
                 directory of libnccl.so on LD_LIBRARY_PATH)"
            );
        }
        let streams = devices
            .iter()
            .map(|d| Ok(d.as_cuda_device()?.cuda_stream()))
            .collect::<Result<Vec<_>>>()?;
        let comms = Comm::from_devices(streams)
            .map_err(|e| candle_core::Error::Msg(format!("ncclCommInitAll: {e:?}")))?;
        Ok(comms
            .into_iter()
            .map(|c| NcclCollective {
                comm: Arc::new(RankComm(c)),
            })
            .collect())
    }
}

fn nccl_err(what: &str) -> impl Fn(NcclError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("{what}: {e:?}"))
}

#[derive(Clone, Copy)]
enum Op {
    AllReduceSum,
    /// Output `[world, ...input dims]`, rank-major.
    AllGather,
}

struct NcclOp<'a> {
    comm: &'a Comm,
    op: Op,
}

impl NcclOp<'_> {
    fn run<T: NcclType + CudaDType + DeviceRepr>(
        &self,
        s: &CudaStorage,
        start: usize,
        end: usize,
    ) -> Result<CudaStorage> {
        let dev = s.device.clone();
        // NCCL enqueues on the communicator's stream from whichever thread calls: make its
        // device current here.
        dev.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let world = self.comm.world_size();
        let out_len = match self.op {
            Op::AllReduceSum => end - start,
            Op::AllGather => (end - start) * world,
        };
        // SAFETY: every element is written by the collective before the slice is read.
        let mut dst: CudaSlice<T> = unsafe { dev.alloc::<T>(out_len)? };
        match self.op {
            Op::AllReduceSum => self
                .comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(nccl_err("ncclAllReduce"))?,
            Op::AllGather => self
                .comm
                .all_gather(&src, &mut dst)
                .map_err(nccl_err("ncclAllGather"))?,
        };
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        match self.op {
            Op::AllReduceSum => "nccl_all_reduce_sum",
            Op::AllGather => "nccl_all_gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("{}: input is not contiguous", self.name());
        };
        let out = match s.dtype() {
            DType::BF16 => self.run::<half::bf16>(s, start, end)?,
            DType::F16 => self.run::<half::f16>(s, start, end)?,
            DType::F32 => self.run::<f32>(s, start, end)?,
            other => bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        let shape = match self.op {
            Op::AllReduceSum => l.shape().clone(),
            Op::AllGather => {
                let mut dims = vec![self.comm.world_size()];
                dims.extend_from_slice(l.dims());
                Shape::from(dims)
            }
        };
        Ok((out, shape))
    }
}

impl Collective for NcclCollective {
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&NcclOp {
            comm: &self.comm.0,
            op: Op::AllReduceSum,
        })
    }

    fn all_gather_last_dim(&self, t: &Tensor) -> Result<Tensor> {
        let g = t.contiguous()?.apply_op1_no_bwd(&NcclOp {
            comm: &self.comm.0,
            op: Op::AllGather,
        })?;
        // [world, a.., d] -> [a.., world, d] -> [a.., world * d]
        let r = t.rank();
        let mut perm: Vec<usize> = (1..r).collect();
        perm.extend([0, r]);
        let mut dims = t.dims()[..r - 1].to_vec();
        dims.push(self.world_size() * t.dims()[r - 1]);
        g.permute(perm)?.contiguous()?.reshape(dims)
    }

    fn rank(&self) -> usize {
        self.comm.0.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.0.world_size()
    }
}
