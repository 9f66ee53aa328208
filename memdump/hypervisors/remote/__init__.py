"""Programs the drivers run on a hypervisor, kept as real files and sent as fixed texts
(read with importlib.resources); memdump itself never imports them."""
