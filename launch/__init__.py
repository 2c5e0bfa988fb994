"""Entry points a user runs: `python -m launch.<script>`, each flags and then calls into the
library. Shared command-line pieces: `run_flags` (a trained run's flags and argv), `commands`
(launchers' shell commands and flag parsing), `fanout` (one worker per device), `tpu_vm` (a TPU
VM's gcloud commands), `compile_check` (the pod launchers' compile check before they submit),
`jobset` (a GKE JobSet of TPU slices)."""
