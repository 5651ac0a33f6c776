"""What the test tiers share: ports, waiting, corral's parts started for a test.

Test modules import from here, never from one another (a test module is not a
library); fixtures that several modules use live here too.
"""
