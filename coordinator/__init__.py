"""The asyncloco coordinator: intake of deltas, outer optimizer, snapshots, commits, status."""
