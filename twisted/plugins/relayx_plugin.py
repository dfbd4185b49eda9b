"""
Makes ``twistd relayx`` available once relayx is installed.
"""

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from relayx import tap


@implementer(IServiceMaker, IPlugin)
class RelayxServiceMaker:
    tapname = "relayx"
    description = "A clustered backup MX: accept mail for your domains, keep it in Redis, replay it in order."
    options = tap.Options

    def makeService(self, options: tap.Options) -> IService:
        return tap.makeService(options)


serviceMaker = RelayxServiceMaker()
