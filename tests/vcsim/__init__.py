"""A vCenter for the vmware tests: govmomi's simulator (vcsim) with a CBT double."""
