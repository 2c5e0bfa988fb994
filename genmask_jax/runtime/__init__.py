"""Where the code runs: the file layer (local or gs://), a local GCS emulator, multi-host
start-up, the device mesh and logical sharding rules, console log filtering."""
