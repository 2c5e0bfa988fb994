"""Entry points a user runs: `python -m launch.<script>`, each flags and then calls into the
library; what they share is in launch/common/."""
