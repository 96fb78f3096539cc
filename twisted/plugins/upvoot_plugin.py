"""twistd plugin: ``twistd upvoot --config FILE``. Kept tiny: twistd imports every plugin."""
from twisted.application.service import ServiceMaker

upvoot = ServiceMaker("upvoot", "upvoot.daemon.tap", "UpVoot voice-agent bridge", "upvoot")
