// A servlet app on embedded Tomcat 10.1 (Debian's libtomcat10-embed-java), the upstream the
// free-path tests put behind the gateway: a free servlet at /public/* and a paid one at
// /private/*, each answering with its own name and the path it was given. Tomcat reads path
// parameters on dot segments (`..;x`) as dot segments, as every servlet container does.
// Run: java -cp <classes>:/usr/share/java/tomcat10-embed-core.jar:\
//     /usr/share/java/jakarta-annotation-api.jar App PORT

import java.io.IOException;
import java.nio.file.Files;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import org.apache.catalina.Context;
import org.apache.catalina.startup.Tomcat;

public class App {
    static HttpServlet named(String name) {
        return new HttpServlet() {
            @Override
            protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
                resp.setContentType("text/plain");
                resp.getWriter().print(name + " " + req.getRequestURI());
            }
        };
    }

    public static void main(String[] args) throws Exception {
        Tomcat tomcat = new Tomcat();
        tomcat.setBaseDir(Files.createTempDirectory("tomcat").toString());
        tomcat.setPort(Integer.parseInt(args[0]));
        tomcat.getConnector().setProperty("address", "127.0.0.1");
        Context ctx = tomcat.addContext("", null);
        Tomcat.addServlet(ctx, "public", named("public"));
        ctx.addServletMappingDecoded("/public/*", "public");
        Tomcat.addServlet(ctx, "private", named("private"));
        ctx.addServletMappingDecoded("/private/*", "private");
        tomcat.start();
        System.out.println("listening");
        tomcat.getServer().await();
    }
}
