# The twistd plugins of hero_compute.  This file imports nothing of the application, so
# that `twistd --help` stays cheap and a broken import cannot break every twistd call.
from twisted.application.service import ServiceMaker

explorer = ServiceMaker(
    "hero_compute explorer",
    "hero_compute.explorer.tap",
    "The registry of hero_compute nodes, and a proxy for calls to them.",
    "explorer",
)

node = ServiceMaker(
    "hero_compute node",
    "hero_compute.node.tap",
    "A hero_compute node: the VMs of this machine, heartbeating explorers.",
    "node",
)
