"""A JobSet (jobset.x-k8s.io/v1alpha2) that runs one command on every host of N GKE TPU slices.

One replicated job per slice (`replicas` = slices), each an Indexed Job of one pod per host of the
slice, pinned by node selectors to node pools of the slice's accelerator and topology and asking
for the host's chips (`google.com/tpu`). With several slices the exclusive-topology annotation
puts each slice's job on a node pool of its own. GKE gives every pod its TPU worker identity and,
across slices, the Megascale settings; `jax.distributed.initialize()` reads them. A failed pod
fails its job, and the JobSet recreates every job, up to `failurePolicy.maxRestarts` times: the
same command then resumes from the last checkpoint in the work directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from genmask_jax.runtime.accelerators import Accelerator

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "slice"
CONTAINER = "genmask"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODE_POOL = "cloud.google.com/gke-nodepool"
TPU_RESOURCE = "google.com/tpu"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# GKE's node label values of each TPU generation (by libtpu's topology prefix).
GKE_ACCELERATORS = {
  "v4": "tpu-v4-podslice",
  "v5p": "tpu-v5p-slice",
  "v5e": "tpu-v5-lite-podslice",
  "v6e": "tpu-v6e-slice",
}
# The TPU runtime's ports (ICI set-up and Megascale, as GKE's TPU examples open them).
TPU_PORTS = (8471, 8080)
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
# tpu_vm.GCSFUSE_FLAGS in the CSI driver's syntax: read-only data, metadata cached for good.
GCSFUSE_OPTIONS = ",".join(
  (
    "implicit-dirs",
    "metadata-cache:ttl-secs:-1",
    "metadata-cache:stat-cache-max-size-mb:-1",
    "metadata-cache:type-cache-max-size-mb:-1",
    "file-system:kernel-list-cache-ttl-secs:-1",
  )
)


@dataclasses.dataclass(frozen=True)
class Workload:
  """What a JobSet runs and where."""

  name: str
  accelerator: Accelerator
  num_slices: int
  image: str
  script: str  # One bash line, run on every host.
  env: Sequence[tuple[str, str]] = ()
  max_restarts: int = 0
  grace_seconds: int = 30
  queue: str | None = None  # A Kueue LocalQueue.
  service_account: str | None = None  # Kubernetes service account (Workload Identity).
  mount_bucket: str | None = None  # Mounted read-only through the gcsfuse CSI driver.
  mount_point: str = "/data"


def node_selector(accelerator: Accelerator) -> dict[str, str]:
  prefix, _, shape = accelerator.topology.partition(":")
  return {
    "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[prefix],
    "cloud.google.com/gke-tpu-topology": shape,
  }


def _container(w: Workload) -> dict:
  chips = {TPU_RESOURCE: str(w.accelerator.chips_per_host)}
  container = {
    "name": CONTAINER,
    "image": w.image,
    "command": ["bash", "-c", w.script],
    "env": [{"name": k, "value": v} for k, v in w.env],
    "ports": [{"containerPort": port} for port in TPU_PORTS],
    "resources": {"requests": chips, "limits": chips},
  }
  if w.mount_bucket:
    container["volumeMounts"] = [{"name": "data", "mountPath": w.mount_point, "readOnly": True}]
  return container


def _pod(w: Workload) -> dict:
  spec = {
    "restartPolicy": "Never",  # The JobSet restarts the whole job, not a pod alone.
    "hostNetwork": True,
    "dnsPolicy": "ClusterFirstWithHostNet",
    "terminationGracePeriodSeconds": w.grace_seconds,
    "nodeSelector": node_selector(w.accelerator),
    "tolerations": [{"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    "containers": [_container(w)],
  }
  metadata = {}
  if w.service_account:
    spec["serviceAccountName"] = w.service_account
  if w.mount_bucket:
    metadata["annotations"] = {"gke-gcsfuse/volumes": "true"}  # Injects the FUSE sidecar.
    attributes = {"bucketName": w.mount_bucket, "mountOptions": GCSFUSE_OPTIONS}
    csi = {"driver": GCSFUSE_DRIVER, "readOnly": True, "volumeAttributes": attributes}
    spec["volumes"] = [{"name": "data", "csi": csi}]
  return {"metadata": metadata, "spec": spec}


def manifest(w: Workload) -> dict:
  """The JobSet of `w` as a dict (kubectl applies it as JSON)."""
  hosts = w.accelerator.hosts
  job = {
    "parallelism": hosts,
    "completions": hosts,
    "completionMode": "Indexed",  # Pod i of a slice is its TPU worker i.
    "backoffLimit": 0,  # One failed pod fails the slice's job: the JobSet restarts them all.
    "template": _pod(w),
  }
  metadata: dict = {"name": w.name}
  if w.num_slices > 1:
    metadata["annotations"] = {EXCLUSIVE_TOPOLOGY: NODE_POOL}
  if w.queue:
    metadata["labels"] = {KUEUE_QUEUE: w.queue}
  return {
    "apiVersion": API_VERSION,
    "kind": "JobSet",
    "metadata": metadata,
    "spec": {
      "failurePolicy": {"maxRestarts": w.max_restarts},
      "replicatedJobs": [
        {"name": REPLICATED_JOB, "replicas": w.num_slices, "template": {"spec": job}}
      ],
    },
  }
