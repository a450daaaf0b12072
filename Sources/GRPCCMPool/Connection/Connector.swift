@_spi(Reactor) import GRPCCMReactor
import GRPCCMTransport
import Synchronization

/// Makes the connections of a subchannel. The pool and its subchannels never name a concrete connection type: they
/// get one from here, so tests drive them with connections that need no socket.
package protocol TransportConnector: Sendable {
    /// A new, unconnected connection to `address`; it reports to `delegate`.
    func makeTransport(
        address: NetworkAddress, id: Int, keepAliveTime: Duration, delegate: any HTTP2TransportDelegate
    ) -> any HTTP2Transport
}

/// Real HTTP/2 connections over sockets (and TLS when the service uses it).
package struct HTTP2Connector: TransportConnector {
    package let reactor: Reactor
    package let authority: String
    package let settings: HTTP2ClientSettings
    package let tls: TLSContextSource?
    package let tlsServerName: String?

    package init(
        reactor: Reactor, authority: String, settings: HTTP2ClientSettings, tls: TLSContextSource?,
        tlsServerName: String?
    ) {
        self.reactor = reactor
        self.authority = authority
        self.settings = settings
        self.tls = tls
        self.tlsServerName = tlsServerName
    }

    package func makeTransport(
        address: NetworkAddress, id: Int, keepAliveTime: Duration, delegate: any HTTP2TransportDelegate
    ) -> any HTTP2Transport {
        let connection = HTTP2ClientConnection(
            reactor: self.reactor, address: address, authority: self.authority, id: id, settings: self.settings,
            keepAliveTime: keepAliveTime, tls: self.tls, tlsServerName: self.tlsServerName)
        connection.delegate = delegate
        return connection
    }
}

/// Hands out connection ids, unique per manager (or per standalone channel), from any of its loops.
package final class ConnectionIDSource: Sendable {
    private let value = Atomic<Int>(0)

    package init() {}

    package func next() -> Int {
        self.value.add(1, ordering: .relaxed).newValue
    }
}
