import COpenSSL
@_spi(Reactor) import GRPCCMReactor
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The client TLS context for a `TLSSettings`, shared and kept current. Every channel with the same settings, whose
/// files are the same on disk, uses one OpenSSL context; a connection made after a file changed (a rotated client
/// certificate, a new CA bundle) gets a context built from the new files, and nothing has to be closed for it.
///
/// Why shared: building a context reads the trust roots, and the system store costs about 15 ms and 0.8 MiB each
/// time, so one context per channel cost a manager of 100 services 1.5 s and 80 MiB. Why checked per connection: a
/// certificate rotated on disk must reach the next handshake; three `stat` calls per connection attempt cost nothing
/// beside it.
package final class TLSContextSource: Sendable {
    package let settings: TLSSettings
    /// The context of the last connection, the stamps of the files it was built from, and the stamps of files that
    /// changed since but could not be loaded, with why and when they were last tried.
    private let last: Mutex<(stamps: [FileStamp], context: TLSContext, refused: Refused?)>
    /// How long a refusal stands for files that have not changed since: a failure may be of the moment, not of the
    /// files (too many open files, a network mount's error), and the files would otherwise wait for their next
    /// change, while the old certificate heads for its expiry.
    private let retryRefusalAfter: UInt64
    /// Builds tried (tests).
    package var buildsTried: Int { self.tried.load(ordering: .relaxed) }
    private let tried = Atomic<Int>(0)

    private struct Refused {
        let stamps: [FileStamp]
        let reason: String
        var triedAt: UInt64
    }

    /// Builds (or finds) the context now: a file that cannot be loaded is reported when the channel is made.
    package init(settings: TLSSettings, retryRefusalAfter: Duration = .seconds(30)) throws(TLSError) {
        self.settings = settings
        self.retryRefusalAfter = UInt64(max(retryRefusalAfter.nanoseconds, 0))
        let stamps = Self.stamps(of: settings)
        self.last = Mutex((stamps, try Self.shared(settings, stamps), nil))
    }

    /// What a new connection uses: the context, and, when the files on disk changed and could not be loaded (so the
    /// context is the last good one), why. `refusedNow`: this choice is the one that tried them (once per change).
    package struct Choice {
        package let context: TLSContext
        package let refusal: String?
        package let refusedNow: Bool
    }

    /// The context for a new connection: the same one while the files are unchanged, else one built from them now.
    /// Changed files that cannot be loaded (a rotation caught half done: the new certificate, the old key) leave the
    /// last good context in use, as grpc-go's file watcher does, until they change again or `retryRefusalAfter`
    /// has passed: a connection that the old files can still make is not failed for it, and the loop does not
    /// rebuild the same refusal every attempt. The refusal is reported (`Choice`): a connection that fails while it
    /// stands says so, and its owner announces it (once per change).
    package func choose() -> Choice {
        let stamps = Self.stamps(of: self.settings)
        let now = Reactor.clock()
        let known = self.last.withLock { last -> Choice? in
            if last.stamps == stamps { return Choice(context: last.context, refusal: nil, refusedNow: false) }
            if let refused = last.refused, refused.stamps == stamps, now &- refused.triedAt < self.retryRefusalAfter {
                return Choice(context: last.context, refusal: refused.reason, refusedNow: false)
            }
            return nil
        }
        if let known { return known }
        self.tried.add(1, ordering: .relaxed)
        do {
            let context = try Self.shared(self.settings, stamps)
            self.last.withLock { $0 = (stamps, context, nil) }
            return Choice(context: context, refusal: nil, refusedNow: false)
        } catch {
            ERR_clear_error()  // what is left of the failure is not the next OpenSSL call's error on this thread
            let reason = "the TLS files changed on disk but could not be loaded, so the last good ones are in use: \(error)"
            return self.last.withLock { last in
                let first = last.refused?.stamps != stamps
                last.refused = Refused(stamps: stamps, reason: reason, triedAt: now)
                return Choice(context: last.context, refusal: reason, refusedNow: first)
            }
        }
    }

    /// Why the context in use is not the files' on disk (they changed and could not be loaded), or nil.
    package var refusal: String? {
        let stamps = Self.stamps(of: self.settings)
        return self.last.withLock { last in last.refused.flatMap { $0.stamps == stamps ? $0.reason : nil } }
    }

    /// The context for a new connection (`choose()` without the refusal).
    package func context() -> TLSContext { self.choose().context }

    // MARK: the process's contexts

    /// What a context is built from: the settings less `serverName`, which each session sets for itself (channels
    /// that differ only in it, such as a manager's etcd services, share one context).
    private struct Key: Hashable {
        let settings: TLSSettings
        let stamps: [FileStamp]

        init(_ settings: TLSSettings, _ stamps: [FileStamp]) {
            var settings = settings
            settings.serverName = nil
            self.settings = settings
            self.stamps = stamps
        }
    }

    private struct Entry {
        weak var context: TLSContext?
    }

    /// Every live context by what it was built from; an entry goes once its context is gone (pruned as others come).
    private static let contexts = Mutex<[Key: Entry]>([:])

    private static func shared(_ settings: TLSSettings, _ stamps: [FileStamp]) throws(TLSError) -> TLSContext {
        let key = Key(settings, stamps)
        if let found = Self.contexts.withLock({ $0[key]?.context }) { return found }
        // Built outside the lock: reading a CA bundle takes milliseconds, and other channels' lookups must not wait.
        let built = try TLSContext(client: settings)
        return Self.contexts.withLock { contexts in
            if let raced = contexts[key]?.context { return raced }
            contexts = contexts.filter { $0.value.context != nil }
            contexts[key] = Entry(context: built)
            return built
        }
    }

    /// The files a context is built from, as they are now (a missing file has a stamp too: its error).
    private static func stamps(of settings: TLSSettings) -> [FileStamp] {
        var paths: [String] = []
        if settings.verifyCertificate, case .file(let path) = settings.trustRoots { paths.append(path) }
        if let chain = settings.certificateChainFile { paths.append(chain) }
        if let key = settings.privateKeyFile { paths.append(key) }
        return paths.map(FileStamp.init(path:))
    }
}

/// What `stat` says of a file: a change to any part means it was written or replaced since.
package struct FileStamp: Hashable, Sendable {
    private let device: UInt64
    private let inode: UInt64
    private let size: Int64
    private let modifiedSeconds: Int64
    private let modifiedNanoseconds: Int64
    private let changedSeconds: Int64
    private let changedNanoseconds: Int64
    /// 0, or the errno of a failed `stat`.
    private let error: Int32

    package init(path: String) {
        var info = stat()
        if stat(path, &info) != 0 {
            self.error = errno
            (self.device, self.inode, self.size) = (0, 0, 0)
            (self.modifiedSeconds, self.modifiedNanoseconds, self.changedSeconds, self.changedNanoseconds) = (0, 0, 0, 0)
            return
        }
        self.error = 0
        self.device = UInt64(info.st_dev)
        self.inode = UInt64(info.st_ino)
        self.size = Int64(info.st_size)
        self.modifiedSeconds = Int64(info.st_mtim.tv_sec)
        self.modifiedNanoseconds = Int64(info.st_mtim.tv_nsec)
        self.changedSeconds = Int64(info.st_ctim.tv_sec)
        self.changedNanoseconds = Int64(info.st_ctim.tv_nsec)
    }
}
