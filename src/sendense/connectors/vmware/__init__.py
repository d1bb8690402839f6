"""The ``vmware`` source: vSphere VMs through pyVmomi, CBT and nbdkit."""
