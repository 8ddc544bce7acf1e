"""The hospital (data owner, key holder): its work folder, keys, data and decisions."""
